"""The ``litemultistep`` command: run workers, see and steer tasks, on the SQLite file (or the
PostgreSQL database) the tasks live in.

Every reading command takes ``--json``: standard output then holds the JSON alone (shapes in
docs/cli.md); logs and progress go to standard error. A user's mistake gets a message and a
non-zero exit, never a traceback.

User text (slugs, ids, paths, callables, messages, tracebacks) is data: it is printed verbatim,
never read as rich markup or emoji, and never wrapped when the output is not a terminal.
"""

from __future__ import annotations

import errno
import functools
import ipaddress
import logging
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import click

# engine, views and the worker are imported by the commands that use them: `litemultistep worker`
# starts its job processes first, so that they start up while it imports the rest
from . import config
from .config import WorkerOptions
from .db import Database, backend_for, is_url
from .errors import DatabaseUnusable, InvalidSetting, LiteMultiStepError

if TYPE_CHECKING:
    from rich.console import Console
    from rich.progress import Progress

    from . import views


@functools.cache
def _console(stderr: bool = False) -> Console:
    """Standard output's (or error's) rich console, made on first use: ``litemultistep worker`` draws
    nothing, and starts sooner without importing rich."""
    from rich.console import Console

    # markup, emoji and highlighting off: a "[bold]" or ":ok:" in a slug or a message is shown as typed
    return Console(stderr=stderr, soft_wrap=True, markup=False, emoji=False, highlight=False)

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}
DB_ENV = config.DB_ENV


def _setup_logging(verbose: bool = False, quiet: bool = False) -> None:
    level = logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s [pid %(process)d] %(message)s"))
    root = logging.getLogger("litemultistep")
    root.handlers[:] = [handler]
    root.setLevel(level)
    root.propagate = False


def _error(message: str) -> None:
    """An error for a person, on standard error: the message verbatim, never wrapped."""
    click.echo(f"Error: {message}", err=True)


def _open(path: str) -> Database:
    """Open for a reading or steering command: a missing or empty file is an error, never created.
    Closed when the command ends (``main`` may run in a long-lived process)."""
    database = Database.open(path, create=False)
    click.get_current_context().call_on_close(database.close)
    return database


def _emit_json(doc: Any) -> None:
    from . import views

    sys.stdout.write(views.to_json(doc, indent=2) + "\n")


def _plural(n: int, word: str) -> str:
    return f"{n:,} {word}" if n == 1 else f"{n:,} {word}s"


def _age(seconds: float) -> str:
    from .views import duration

    return duration(seconds)


def _when(t: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t))


# C0 and C1 control characters but the newline: a C1 (e.g. U+009B, CSI) drives terminals too
_CONTROL = {c: f"\\x{c:02x}" for c in [*range(0x20), *range(0x7F, 0xA0)] if c != 0x0A}


def _safe(text: str) -> str:
    """Text for a terminal: control characters (ESC, CR, BEL, CSI...) shown as escapes, so a message
    can never drive the terminal. Piped output is never passed through this: it stays byte-exact."""
    return text.translate(_CONTROL)


def say(*parts: str | tuple[str, str], to: Console | None = None) -> None:
    """Print a line of user text: exactly as stored when piped; in a terminal, styled parts
    (``(text, style)``) with control characters escaped. Never markup, never wrapped."""
    to = to or _console()
    if not to.is_terminal:
        print("".join(p if isinstance(p, str) else p[0] for p in parts), file=to.file, flush=True)
        return
    from rich.text import Text

    to.print(Text.assemble(*[_safe(p) if isinstance(p, str) else (_safe(p[0]), p[1]) for p in parts]))


def _table(title: str, columns: Sequence[str], rows: list[list[Any]], right: Sequence[str] = ()) -> None:
    """Rows as a table in a terminal; piped, as tab-separated lines (a header first), nothing cut."""
    from rich.progress_bar import ProgressBar
    from rich.table import Table
    from rich.text import Text

    def width(cell: Any) -> int:
        return int(cell.width or 40) if isinstance(cell, ProgressBar) else len(
            cell.plain if isinstance(cell, Text) else str(cell))

    # every cell and header whole, with the table's borders and padding: else rich would cut a state
    # to "bl…" or fold an id, so the table would no longer say it in words
    widest = sum(max([len(name), *(width(r[i]) for r in rows)]) + 3 for i, name in enumerate(columns)) + 1
    out = _console()
    if not out.is_terminal or widest > out.width:  # a cut or folded id could not be copied: plain lines
        bars = {i for i, cell in enumerate(rows[0]) if isinstance(cell, ProgressBar)} if rows else set()
        print("\t".join(c for i, c in enumerate(columns) if i not in bars))
        for row in rows:
            parts = [str(cell.plain if isinstance(cell, Text) else cell) for cell in row
                     if not isinstance(cell, ProgressBar)]
            print("\t".join(parts if not out.is_terminal else map(_safe, parts)))  # user text escaped, tabs kept
        return
    table = Table(title=title, title_justify="left")
    for col in columns:
        table.add_column(col, justify="right" if col in right else "left", no_wrap=True)
    for row in rows:
        table.add_row(*[c if isinstance(c, (Text, ProgressBar)) else Text(_safe(str(c))) for c in row])
    out.print(table)


class PositiveSeconds(click.ParamType):
    """A finite number of seconds above zero (``nan`` and ``inf`` are refused)."""

    name = "SECONDS"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> float:
        try:
            return config.seconds(value, text_ok=True)
        except InvalidSetting as e:
            self.fail(str(e), param, ctx)


def _looks_like_db(arg: str) -> bool:
    return is_url(arg) or os.path.exists(arg) or arg.endswith((".sqlite", ".sqlite3", ".db"))


def split_db(args: Sequence[str], most: int, least: int = 0) -> tuple[str, list[str]]:
    """``DB`` and the other positional arguments of a command taking ``[DB] ARG...``.

    DB is the first argument when all ``most + 1`` are given, or when it names a database file;
    otherwise it comes from ``LITEMULTISTEP_DB``, so ``LITEMULTISTEP_DB=app.sqlite litemultistep
    status TASK_ID`` works as users expect.
    """
    args = list(args)
    env = os.environ.get(DB_ENV) or None
    if len(args) > most + 1:
        raise click.UsageError(f"too many arguments: {' '.join(args[most + 1:])}")
    if len(args) == most + 1 or (args and len(args) > least and (env is None or _looks_like_db(args[0]))):
        return args[0], args[1:]
    if env is None:
        raise click.UsageError(f"name the database: give DB first, or set {DB_ENV}")
    return env, args


def _db_then(metavar: str) -> Any:
    return click.argument("args", nargs=-1, metavar=f"[DB] {metavar}".strip())


json_option = click.option("--json", "as_json", is_flag=True, help="Print JSON alone on standard output.")

DB_HELP = (f"DB is the SQLite file your application creates tasks in, or a postgresql:// URL; it may come "
           f"from {DB_ENV} instead.")


@click.group(context_settings=CONTEXT, invoke_without_command=True)
@click.version_option(package_name="litemultistep", prog_name="litemultistep")
@click.pass_context
def cli(ctx: click.Context) -> None:
    """Multi-step tasks on one SQLite file (or a PostgreSQL database): run workers, see progress,
    retry failures.

    DB, the first argument of every command, is the SQLite file your application creates tasks in,
    or a postgresql://user@host/dbname URL; it may come from LITEMULTISTEP_DB instead.
    """
    if ctx.invoked_subcommand is None:
        click.echo(ctx.get_help())


# -- worker -----------------------------------------------------------------------------------------


@cli.command(context_settings=CONTEXT)
@_db_then("")
@click.option("-c", "--concurrency", type=click.IntRange(1, 256), default=1, show_default=True,
              envvar="LITEMULTISTEP_CONCURRENCY", show_envvar=True,
              help="Job processes: how many jobs run at once.")
@click.option("--queues", multiple=True, metavar="GLOB", envvar="LITEMULTISTEP_QUEUES", show_envvar=True,
              help="Serve only task queues whose name (the task id) matches; repeatable. Default: all.")
@click.option("--burst", is_flag=True, envvar="LITEMULTISTEP_BURST", show_envvar=True,
              help="Exit 0 once nothing is queued or running (failed jobs included). On SQLite it "
                   "looks for new work every --poll seconds meanwhile.")
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
              help="On PostgreSQL: seconds a silent worker keeps its jobs before others take them (it "
                   "stops them itself a quarter of the lease before). On SQLite, where liveness is the "
                   "worker's OS lock, exact on one host: how long one whose lock file was removed still "
                   "counts as alive. At least 1.")
@click.option("--batch", type=click.IntRange(1, 1000), default=256, show_default=True,
              envvar="LITEMULTISTEP_BATCH", show_envvar=True,
              help="Most jobs handed to a job process at once; fewer when a task's jobs take longer than "
                   "50 ms in all.")
@click.option("--poll", type=click.FloatRange(0.001, 5), default=0.02, show_default=True,
              envvar="LITEMULTISTEP_POLL", show_envvar=True,
              help="Seconds between looks for new work while idle, with --burst on SQLite or where "
                   "inotify is not available.")
@click.option("-v", "--verbose", is_flag=True, envvar="LITEMULTISTEP_VERBOSE", show_envvar=True,
              help="Log debug details.")
@click.option("-q", "--quiet", is_flag=True, envvar="LITEMULTISTEP_QUIET", show_envvar=True,
              help="Log warnings and errors only (no line per job).")
def worker(args: Sequence[str], concurrency: int, queues: Sequence[str], burst: bool, paths: Sequence[str],
           allow_modules: Sequence[str], timeout: float | None, shutdown_timeout: float, max_crashes: int,
           lease: float, batch: int, poll: float, verbose: bool, quiet: bool) -> None:
    """Run jobs from DB in N job processes, each running one job at a time.

    The worker process itself runs no job: it claims jobs, records results, enforces time limits and
    keeps its liveness, so a job that hangs or crashes cannot harm it. A job that raises is recorded
    as a failure; one that kills its process is retried up to --max-crashes times, then fails.

    SIGTERM or Ctrl-C lets running jobs finish (at most --shutdown-timeout seconds) and exits 0; a
    second one stops them at once, puts them back in their queues and exits 1; so does a stop whose
    jobs outlast --shutdown-timeout. Exit 2: the worker cannot work (bad database, bad option).

    A DB path where no file is gets a new, empty database (the worker may start before the
    application), with a warning that names the path.

    DB may come from LITEMULTISTEP_DB; each option from the variable shown beside it.
    """
    # From here a stop signal is held, not fatal: the worker, once started, acts on it as on any other.
    early: list[int] = []
    for s in (signal.SIGTERM, signal.SIGINT):
        signal.signal(s, lambda signum, frame: early.append(signum))
    if signal.getsignal(signal.SIGCHLD) == signal.SIG_IGN:
        # inherited: with SIGCHLD ignored, the kernel reaps children unasked, and neither this
        # process nor a job could learn how a child ended (waitpid fails)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    db, _ = split_db(args, 0)
    _setup_logging(verbose, quiet)
    options = WorkerOptions(db=db, concurrency=concurrency, queues=list(queues), burst=burst, paths=list(paths),
                            lease=lease, batch=batch, poll=poll, allow_modules=list(allow_modules),
                            timeout=timeout, shutdown_timeout=shutdown_timeout, max_crashes=max_crashes,
                            verbose=verbose, quiet=quiet)
    try:
        options.validate()  # a bad option is refused before any process starts or file is made
        config.validate()
        backend = backend_for(db)
        # the job processes start up (a tenth of a second) while this process imports the rest
        from .jobproc import JobProcess

        fence = None if backend.fence_after(lease) is None else 0.0  # set once the lease is confirmed
        procs = [JobProcess(options, slot, fence, fork=True) for slot in range(concurrency)]
        try:
            backend.prepare_worker_process()
            if not is_url(db) and _no_database_at(db):
                _create_database(db)
            from .worker import run_worker
        except BaseException:
            for proc in procs:
                proc.end()
            raise
        code = run_worker(options, procs, early)
    except (DatabaseUnusable, InvalidSetting) as e:
        _error(str(e))
        sys.exit(2)
    _quick_exit.append(code)
    sys.exit(code)


def _no_database_at(path: str) -> bool:
    """No file at ``path``, or an empty one (which SQLite would take as a new database)."""
    try:
        return os.path.isfile(path) and os.path.getsize(path) == 0 or not os.path.exists(path)
    except OSError:
        return False


def _create_database(path: str) -> None:
    """A worker on a path where no file is creates an empty database there, as the application does:
    it may start first. Said in a warning, since a mistyped path would otherwise wait forever."""
    Database.open(path).close()
    logging.getLogger("litemultistep").warning(
        "no database at %s: created a new, empty one; is the path right?",
        os.path.abspath(path))


# -- status and watch -------------------------------------------------------------------------------


def _counts(p: views.Progress) -> str:
    text = (f"{p.completed_count} done / {p.failed_count} failed / {p.pending_count} pending / "
            f"{p.running_count} running of {p.total_job_count}")
    return text + (f" ({p.scheduled_count} retry scheduled)" if p.scheduled_count else "")


def _call(func: str, args: str) -> str:
    return f"{func}{args}"


@cli.command(context_settings=CONTEXT)
@_db_then("[TASK_ID]")
@json_option
def status(args: Sequence[str], as_json: bool) -> None:
    """Show active and recently finished tasks, or one task in detail (with TASK_ID)."""
    from . import views

    db, rest = split_db(args, 1)
    database = _open(db)
    if rest:
        _status_one(database, rest[0], as_json)
        return
    if as_json:
        _emit_json(views.status_doc(database))
        return
    from rich.progress_bar import ProgressBar

    active, finished = views.active_tasks(database), views.finished_tasks(database)
    now = time.time()
    if not active and not finished:
        say("No active tasks.")
        return
    from rich.text import Text

    terminal = _console().is_terminal
    # in a terminal: a bar and its percent; piped (and in a terminal too narrow): the percent alone.
    # States are words, never a colour alone (TERM=dumb, NO_COLOR, a colour-blind reader).
    columns = ["task", "state", "progress", *(["%"] if terminal else []), "done", "failed", "scheduled",
               "pending", "running", "total", "age"]

    def row(p: views.Progress, age: str) -> list[Any]:
        done = 100.0 if p.finished else p.percent
        percent = f"{done:.0f}%"
        total = max(p.total_job_count, 1)
        bar = (ProgressBar(total=total, completed=total if p.finished else p.completed_count, width=20)
               if terminal else percent)
        state = Text(p.state, _STATE_STYLES.get(p.state, "")) if terminal else p.state
        return [p.task_id, state, bar, *([percent] if terminal else []), p.completed_count,
                Text(str(p.failed_count), "red") if terminal and p.failed_count else p.failed_count,
                p.scheduled_count, p.pending_count, p.running_count, p.total_job_count, age]

    _table(f"Tasks in {database.path}", columns,
           [row(p, _age(now - p.created_at)) for p in active]
           + [row(p, f"finished {_age(now - (p.finished_at or now))} ago") for p in finished],
           right=("%", "done", "failed", "scheduled", "pending", "running", "total"))
    _say_dead_holders(views.jobs_of_dead_workers(database))


#: how a task's state is coloured in a terminal (its name says it without the colour)
_STATE_STYLES = {"blocked": "red", "finished": "green", "finalizing": "cyan", "building": "dim"}


def _status_one(database: Database, task_id: str, as_json: bool) -> None:
    from . import views

    if as_json:
        _emit_json(views.task_doc(database, task_id))
        return
    p = views.progress(database, task_id)
    chain = views.finalizers(database, task_id)
    fails = views.failures(database, task_id)
    running = views.running_jobs(database, task_id)
    scheduled = views.scheduled_retries(database, task_id)
    now = time.time()
    say((p.task_id, "bold"), f"  {p.state}  {p.percent:.0f}%")
    say(f"  {_counts(p)}")
    say(f"  normal jobs {p.normal_job_count}, finalization jobs {p.finalize_job_count}, "
        f"finalizable: {'yes' if p.finalizable else 'no'}"
        + (f", at most {p.max_running} running at once" if p.max_running is not None else "")
        + (f", priority {p.priority}" if p.priority else ""))
    if chain:
        say("  finalizers:")
        for link in chain:
            say(f"    {link['position'] + 1}. {_call(link['func'], link['args'])} {link['state']}")
    for r in running:
        since = f"for {_age(now - r.claimed_at)}" if r.claimed_at else ""
        reported = "" if r.reported_done is None else (
            f", reports {r.reported_done:g}" + (f" of {r.reported_total:g}" if r.reported_total is not None else ""))
        say(f"  running {'finalizer' if r.finalizer else 'job'} {r.job_id} {_call(r.func, r.args)} "
            f"{since} (worker {r.worker_id}, attempt {r.attempt}{reported})")
        if not r.worker_alive:
            say(("    dead:", "red"), f" {r.dead_worker_note()}")
    for sch in scheduled:
        say(f"  retry of job {sch.job_id} {_call(sch.func, sch.args)} scheduled at {_when(sch.run_at)} "
            f"(after {sch.exc_type}: {sch.message})")
    for failure in fails:
        say(("  failed", "red"), f" job {failure.job_id} {_call(failure.func, failure.args)}: "
                                 f"{failure.exc_type}: {failure.message}")


@cli.command(context_settings=CONTEXT)
@_db_then("TASK_ID")
@click.option("--timeout", type=PositiveSeconds(), default=None, help="Give up (exit 2) after this many seconds.")
@click.option("--interval", type=click.FloatRange(0.01), default=0.2, show_default=True,
              help="Seconds between updates.")
def watch(args: Sequence[str], timeout: float | None, interval: float) -> None:
    """Follow a task with a progress bar until it finishes (exit 0) or is blocked by failures (exit 1).

    Failures show as they come; "blocked" means nothing else is queued, running or scheduled, so
    nothing more happens without a retry. Ctrl-C exits 130.
    """
    from . import views

    db, rest = split_db(args, 1, least=1)
    if not rest:
        raise click.UsageError("name the task to watch: TASK_ID")
    task_id = rest[0]
    database = _open(db)
    views.progress(database, task_id)  # an unknown id fails before any bar is drawn
    deadline = None if timeout is None else time.monotonic() + timeout
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    err = _console(stderr=True)
    bar = Progress(TextColumn("{task.description}", markup=False), BarColumn(), MofNCompleteColumn(),
                   TextColumn("{task.fields[rate]}", markup=False), TimeRemainingColumn(), console=err,
                   transient=False, disable=not err.is_terminal)
    # Ctrl-C only sets a flag, seen between two polls: an interrupt raised at a random point of the
    # loop could leave the progress bar's lock taken, and the process hung on its way out.
    interrupted = threading.Event()
    previous = signal.signal(signal.SIGINT, lambda signum, frame: interrupted.set())
    try:
        _watch_loop(database, task_id, bar, deadline, timeout, interval, interrupted)
    finally:
        signal.signal(signal.SIGINT, previous)
    if interrupted.is_set():
        sys.exit(130)


def _watch_loop(database: Database, task_id: str, bar: Progress, deadline: float | None, timeout: float | None,
                interval: float, interrupted: threading.Event) -> None:
    from . import views

    err = _console(stderr=True)
    last_line = ""
    seen: set[int] = set()
    with bar:
        handle = bar.add_task(task_id, total=None, rate="")
        while True:
            p = views.progress(database, task_id)
            speed = bar.tasks[0].speed
            inside = "" if p.reported_done is None else (  # what running jobs report of themselves
                f" running jobs report {p.reported_done:g}"
                + (f" of {p.reported_total:g}" if p.reported_total is not None else ""))
            bar.update(handle, total=p.total_job_count, completed=p.completed_count,
                       rate=(f"{speed:,.1f} jobs/s" if speed else "") + inside)
            for f in views.failures(database, task_id) if p.failed_count else []:
                if f.job_id not in seen:
                    seen.add(f.job_id)
                    say(("failed:", "red"), f" job {f.job_id} {f.func}: {f.exc_type}: {f.message}", to=err)
            if not err.is_terminal:
                line = f"{task_id}: {_counts(p)} ({p.state}){';' if inside else ''}{inside}"
                if line != last_line:
                    say(line, to=err)
                    last_line = line
            if p.settled:
                break
            if deadline is not None and time.monotonic() >= deadline:
                say(f"{task_id} did not finish within {timeout:g} s: {_counts(p)}", to=err)
                sys.exit(2)
            if interrupted.wait(interval):
                return
    if p.finished:
        say(f"{task_id} finished: {_plural(p.total_job_count, 'job')} done")
        return
    say(f"{task_id} is blocked by {_plural(p.failed_count, 'failed job')}:")
    for f in views.failures(database, task_id):
        say(f"  job {f.job_id} {f.func}: {f.exc_type}: {f.message}")
    say(f"Retry them with: litemultistep retry {database.path} --task {task_id}")
    sys.exit(1)


# -- failures ---------------------------------------------------------------------------------------


@cli.command(context_settings=CONTEXT)
@_db_then("")
@click.option("--task", "task_id", metavar="TASK_ID", help="Only this task's failures.")
@click.option("--exc-type", metavar="NAME", help="Only failures of this exception type (as shown, e.g. KeyError "
                                                 "or mymodule.MyError).")
@click.option("--group", "grouped", is_flag=True, help="One line per exception type and message, with how many "
                                                      "jobs, when the first and the last failed, and a few job ids.")
@click.option("--limit", type=click.IntRange(1), metavar="N", help="At most N failures (with --group: N groups), "
                                                                   "and N scheduled retries.")
@click.option("--traceback", "show_traceback", is_flag=True, help="Show each failure's traceback.")
@json_option
def failed(args: Sequence[str], task_id: str | None, exc_type: str | None, grouped: bool, limit: int | None,
           show_traceback: bool, as_json: bool) -> None:
    """List failed jobs (job id, task, call, exception and message, attempt, time), and the failed
    jobs whose automatic retry is scheduled (`retry` runs them now); with --group, how many jobs
    failed of each exception and message."""
    from . import views

    db, _ = split_db(args, 0)
    database = _open(db)
    if exc_type is not None and "\x00" in exc_type:
        raise click.UsageError("--exc-type cannot hold a NUL character")
    if grouped:
        _failed_groups(database, task_id, exc_type, limit, as_json)
        return
    if as_json:
        doc = views.failures_doc(database, task_id, exc_type, limit)
        doc["scheduled"] = doc["scheduled"][:limit]
        _emit_json(doc)
        return
    if task_id is not None:
        views.progress(database, task_id)  # unknown id: a clear error
    fails = views.failures(database, task_id, exc_type, limit)
    scheduled = [s for s in views.scheduled_retries(database, task_id)
                 if exc_type is None or s.exc_type == exc_type][:limit]
    if not fails and not scheduled:
        say("No failed jobs" + (" match." if exc_type else "."))
        return
    for f in fails:
        kind = "finalizer" if f.finalizer else "job"
        say(f"{kind} {f.job_id} of {f.task_id}: {_call(f.func, f.args)}  attempt {f.attempt}"
            f"{f' (round {f.round})' if f.round > 1 else ''}, "
            f"{_when(f.failed_at)}")
        say(f"  {f.exc_type}: {f.message}")
        if show_traceback and f.traceback:
            say("  " + f.traceback.rstrip().replace("\n", "\n  "))
    for sch in scheduled:
        say(f"job {sch.job_id} of {sch.task_id}: {_call(sch.func, sch.args)}  attempt {sch.attempt} failed, "
            f"retry scheduled at {_when(sch.run_at)}")
        say(f"  {sch.exc_type}: {sch.message}")


def _failed_groups(database: Database, task_id: str | None, exc_type: str | None, limit: int | None,
                   as_json: bool) -> None:
    from . import views

    if as_json:
        _emit_json(views.groups_doc(database, task_id, exc_type, limit))
        return
    if task_id is not None:
        views.progress(database, task_id)
    groups = views.failure_groups(database, task_id, exc_type, limit)
    if not groups:
        say("No failed jobs" + (" match." if exc_type else "."))
        return
    for g in groups:
        more = ", ..." if g.count > len(g.job_ids) else ""
        say((f"{g.count:,}", "bold"), f" {'job' if g.count == 1 else 'jobs'}  {g.exc_type}: {g.message}")
        when = (f"failed at {_when(g.first_failed_at)}" if g.count == 1 else
                f"first failed {_when(g.first_failed_at)}, last {_when(g.last_failed_at)}")
        say(f"  {when}; job{'s' if g.count > 1 else ''} {', '.join(map(str, g.job_ids))}{more}")


@cli.command(context_settings=CONTEXT)
@_db_then("[JOB_ID]...")
@click.option("--task", "task_id", metavar="TASK_ID", help="Retry every failed job of this task.")
@click.option("--all", "retry_all", is_flag=True, help="Retry every failed job.")
@json_option
def retry(args: Sequence[str], task_id: str | None, retry_all: bool, as_json: bool) -> None:
    """Requeue failed jobs (JOB_ID ..., --task ID or --all), and run scheduled automatic retries now.

    A retried finalizer resumes its chain; a job that hit the crash limit starts afresh.
    """
    from . import engine, views

    args = list(args)
    db, rest = (args[0], args[1:]) if args and not _is_number(args[0]) else (os.environ.get(DB_ENV) or "", args)
    if not db:
        raise click.UsageError(f"name the database: give DB first, or set {DB_ENV}")
    bad = [a for a in rest if not _is_number(a)]
    if bad:
        raise click.UsageError(f"a job id is a whole number, not {bad[0]!r}")
    if sum(bool(x) for x in (rest, task_id, retry_all)) != 1:
        raise click.UsageError("name what to retry: JOB_ID ..., --task TASK_ID, or --all (one of them)")
    database = _open(db)
    if rest:
        ids = engine.retry_jobs(database, [views.parse_job_id(a) for a in rest])
    elif task_id is not None:
        ids = engine.retry_task(database, task_id)
    else:
        ids = engine.retry_all(database)
    if as_json:
        _emit_json({"retried": ids})
    elif ids:
        say(f"Requeued {_plural(len(ids), 'job')}: {', '.join(map(str, ids))}")
    else:
        say("No failed jobs to retry.")


def _is_number(text: str) -> bool:
    """Digits 0 to 9 only (``str.isdigit`` takes "²" and "٣" too)."""
    return text.isascii() and text.isdigit()


# -- workers, nuke, check ---------------------------------------------------------------------------


@cli.command(context_settings=CONTEXT)
@_db_then("")
@json_option
def workers(args: Sequence[str], as_json: bool) -> None:
    """List registered workers: pid, since when, alive or not, the jobs each runs and for how long.

    Only looks: a dead worker stays listed (alive: no) until a worker or `check --repair` removes it.
    """
    from . import views

    db, _ = split_db(args, 0)
    database = _open(db)
    if as_json:
        _emit_json(views.workers_doc(database))
        return
    rows = views.workers(database)
    if not rows:
        say("No workers.")
        return
    from rich.text import Text

    held = {r.job_id: r for r in views.running_jobs(database)}
    now = time.time()

    def running(w: views.WorkerInfo) -> str:
        ages = []
        for job_id in w.running_job_ids:
            r = held.get(job_id)
            ages.append((job_id, _age(now - r.claimed_at) if r and r.claimed_at else ""))
        return _id_runs(ages)

    _table(f"Workers on {database.path}", ["id", "pid", "host", "kind", "processes", "since", "alive",
                                            "running jobs", "queues"],
           [[w.id, w.pid, w.hostname, w.kind, w.concurrency, _age(now - w.started_at) + " ago",
             "yes" if w.alive else Text("no", "red") if _console().is_terminal else "no", running(w), w.queues or "all"]
            for w in rows])
    _say_dead_holders(views.jobs_of_dead_workers(database))


def _say_dead_holders(orphans: Sequence[views.RunningJob]) -> None:
    """A line for each dead worker that still holds jobs (looking changes nothing: they stay held
    until a live worker, within a second, or `check --repair` puts them back)."""
    from . import views

    by_worker: dict[int | None, list[views.RunningJob]] = {}
    for r in orphans:
        by_worker.setdefault(r.worker_id, []).append(r)
    for worker_id, held in by_worker.items():
        who = f"worker {worker_id}" if worker_id is not None else "a worker no longer registered"
        jobs = "; ".join(f"{'jobs' if a != b else 'job'} {a}{'' if a == b else f'-{b}'} of {task}"
                         for a, b, task in views.id_runs([(r.job_id, r.task_id) for r in held]))
        it = "it" if len(held) == 1 else "them"
        say(("dead:", "red"), f" {who} is dead; `check --repair` or any live worker puts {it} back ({jobs})")


def _id_runs(jobs: Sequence[tuple[int, str]]) -> str:
    """Job ids with how long each has been held, consecutive ids held as long joined into one run
    (a batch of short jobs is one item, not a hundred): ``"656-798 (0s), 1195 (2m)"``."""
    from . import views

    return ", ".join(f"{a}{'' if a == b else f'-{b}'}{f' ({age})' if age else ''}"
                     for a, b, age in views.id_runs(jobs)) or "-"


@cli.command(context_settings=CONTEXT)
@_db_then("TASK_ID")
@click.option("--yes", is_flag=True, help="Do not ask first.")
def nuke(args: Sequence[str], yes: bool) -> None:
    """Remove a task, its queue and its failures; for a finished task, its kept summary."""
    from . import engine, views

    db, rest = split_db(args, 1, least=1)
    if not rest:
        raise click.UsageError("name the task to remove: TASK_ID")
    task_id = rest[0]
    database = _open(db)
    p = views.progress(database, task_id)
    what = f"the summary of finished task {task_id}" if p.finished else f"task {task_id}"
    if not yes:
        click.confirm(f"Remove {what}{'' if p.finished else f' ({_counts(p)})'}?", abort=True, err=True)
    running = engine.nuke(database, task_id)
    say(f"Removed {what}." + (f" Its {_plural(running, 'running job')} stop within about a second (their "
                              "workers end them, and whatever they started)." if running else ""))


@cli.command(context_settings=CONTEXT)
@_db_then("")
@click.option("--repair", is_flag=True, help="Fix what is found.")
@json_option
def check(args: Sequence[str], repair: bool, as_json: bool) -> None:
    """Recount counters from the job rows; find jobs held by dead workers, dead workers still listed,
    stalled finalizations and abandoned `with` blocks; run SQLite's integrity check.

    Exits 0 when nothing is wrong (or everything found was repaired), 1 when problems remain.
    """
    from . import engine

    db, _ = split_db(args, 0)
    database = _open(db)
    problems = engine.check(database, repair=repair)
    remaining = [p for p in problems if not p.repaired]
    if as_json:
        _emit_json({"ok": not remaining, "found": len(problems), "repaired": len(problems) - len(remaining),
                    "problems": [p.__dict__ for p in problems]})
    elif not problems:
        say(f"{database.path}: ok")
    else:
        for p in problems:
            what = "repaired" if p.repaired else "found"
            say(f"{what}: {p.kind}{' ' + p.task_id if p.task_id else ''}: {p.detail}")
        if not remaining:
            say(f"{database.path}: ok after repair")
    if remaining:
        sys.exit(1)


# -- web ------------------------------------------------------------------------------------------


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _listen(host: str, port: int) -> socket.socket:
    """The server's socket, bound here so that a taken port or an unknown host is a clear error."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host.strip("[]"), port, type=socket.SOCK_STREAM)[0]
    except socket.gaierror as e:
        raise click.UsageError(f"cannot listen on {host!r}: {e.strerror}") from None
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError as e:
        sock.close()
        hint = " (is another `litemultistep web` running? pick another --port)" if e.errno == errno.EADDRINUSE else ""
        raise click.UsageError(f"cannot listen on {host} port {port}: {e.strerror}{hint}") from None
    sock.listen(128)
    sock.set_inheritable(True)
    return sock


@cli.command(context_settings=CONTEXT)
@_db_then("")
@click.option("--host", default="127.0.0.1", show_default=True, envvar="LITEMULTISTEP_WEB_HOST", show_envvar=True,
              help="Address to listen on. Anything but a loopback address needs --password.")
@click.option("--port", type=click.IntRange(0, 65535), default=8023, show_default=True,
              envvar="LITEMULTISTEP_WEB_PORT", show_envvar=True, help="Port to listen on (0: any free port).")
@click.option("--allow-actions", is_flag=True, help="Offer retry and nuke buttons (POST with a CSRF token). "
                                                     "Default: the page only reads.")
@click.option("--password", envvar="LITEMULTISTEP_WEB_PASSWORD", show_envvar=True, metavar="TEXT",
              help="Ask every visitor for this password (HTTP basic authentication, any user name); "
                   "prefer the variable, which other users cannot see in the process list.")
@click.option("--refresh", type=PositiveSeconds(), default=1.0, show_default=True,
              help="Seconds between a visible page's live updates.")
@click.option("-v", "--verbose", is_flag=True, help="Log every request.")
def web(args: Sequence[str], host: str, port: int, allow_actions: bool, password: str | None, refresh: float,
        verbose: bool) -> None:
    """Serve a web page on DB: tasks with live progress bars, each task's finalization chain and
    failures with tracebacks, failures across tasks, workers; and a JSON API (/api/tasks,
    /api/tasks/TASK_ID, /api/failures, /api/workers) with the shapes of --json.

    Nothing is written by looking. Read-only unless --allow-actions. It listens on 127.0.0.1; any
    other address needs a password, which plain HTTP carries in clear: across a network you do not
    trust, serve it behind a TLS proxy. Ctrl-C or SIGTERM stops it.

    Needs the web extra: pip install 'litemultistep[web]'. DB may come from LITEMULTISTEP_DB.
    """
    db, _ = split_db(args, 0)
    try:
        import uvicorn

        from . import web as web_page
    except ImportError as e:
        raise click.UsageError(f"the web page needs the web extra: pip install 'litemultistep[web]' ({e})") from None
    loopback = _is_loopback(host)
    if not loopback and not password:
        raise click.UsageError(f"--host {host} lets other machines reach the page: give --password (or set "
                               "LITEMULTISTEP_WEB_PASSWORD), or listen on 127.0.0.1")
    _setup_logging(verbose)
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        logger = logging.getLogger(name)
        logger.handlers[:] = logging.getLogger("litemultistep").handlers
        logger.setLevel(logging.INFO if verbose else logging.WARNING)
        logger.propagate = False
    database = _open(db)
    page = web_page.app(database, allow_actions=allow_actions, password=password, refresh=refresh,
                        allowed_hosts=[*web_page.LOOPBACK_HOSTS, host] if loopback and not password else None)
    sock = _listen(host, port)
    bound = sock.getsockname()[1]
    shown = f"[{host}]" if ":" in host and not host.startswith("[") else host
    _console(stderr=True).print(
        f"Serving {database.path} at http://{shown}:{bound}/ "
        f"({'actions on' if allow_actions else 'read-only'}{', password required' if password else ''}); Ctrl-C stops.")
    config = uvicorn.Config(page, log_config=None, access_log=verbose, lifespan="off",
                            timeout_graceful_shutdown=2)
    uvicorn.Server(config).run(sockets=[sock])


#: set by a worker that has finished all its work: the process may end without tearing down the
#: interpreter (tens of milliseconds, which a --burst worker's caller would wait for)
_quick_exit: list[int] = []


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command with ``argv`` (default: ``sys.argv[1:]``); returns the exit status."""
    if argv is None:  # the `litemultistep` process itself, not a call from Python
        _standard_descriptors_open()
    code = _main(argv)
    if _quick_exit and argv is None:  # the `litemultistep` process itself, not a call from Python
        logging.shutdown()
        for stream in (sys.stdout, sys.stderr):
            if stream is not None:  # None when the process was started with it closed
                stream.flush()
        os._exit(code)
    return code


def _standard_descriptors_open() -> None:
    """Open /dev/null on a standard descriptor (0, 1, 2) the process was started without (``>&-``):
    else the next file or pipe opened takes its number, and a worker's log lines, or a job's prints,
    would go into it (a job process's pipe from its worker, say)."""
    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
        except OSError:
            null = os.open(os.devnull, os.O_RDWR)  # the lowest free number: this one, as those below are open
            if null != fd:
                os.dup2(null, fd)
                os.close(null)


def _main(argv: Sequence[str] | None) -> int:
    try:
        cli.main(args=list(argv) if argv is not None else None, prog_name="litemultistep",
                 standalone_mode=False)
    except click.exceptions.Abort as e:
        if isinstance(e.__cause__, KeyboardInterrupt):
            return 130  # Ctrl-C
        click.echo("Aborted.", err=True)
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
