"""Job callables for the tests: importable by the test process and by worker processes alike."""

from __future__ import annotations

import asyncio
import os
import time
from os.path import join as path_join  # noqa: F401 - imported by name: --allow-module must refuse it

import litemultistep


def _append(path: str, line: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, (line + "\n").encode())
    finally:
        os.close(fd)


def record(path: str, tag: str) -> None:
    _append(path, f"{tag} {os.getpid()}")


def paced_record(path: str, tag: str) -> None:
    """Like record, taking 10 ms: enough work for several workers to share."""
    time.sleep(0.01)
    record(path, tag)


def record_kw(path: str, *, tag: str, extra: list | None = None) -> None:
    _append(path, f"{tag} {extra!r}")


def slow_record(path: str, tag: str, seconds: float) -> None:
    _append(path, f"start {tag} {os.getpid()}")
    time.sleep(seconds)
    _append(path, f"end {tag} {os.getpid()}")


def noop(*args: object) -> None:
    return None


def boom(message: str = "boom") -> None:
    raise RuntimeError(message)


def fail_once(marker: str, message: str = "first attempt fails on purpose") -> None:
    if not os.path.exists(marker):
        open(marker, "w").close()
        raise ValueError(message)


def fail_times(counter: str, times: int) -> None:
    """Fail the first ``times`` calls (counted in a file), then succeed."""
    n = 0
    if os.path.exists(counter):
        with open(counter) as f:
            n = int(f.read())
    with open(counter, "w") as f:
        f.write(str(n + 1))
    if n < times:
        raise ValueError(f"failure {n + 1} of {times}")


def fan_out(path: str, n: int) -> None:
    task = litemultistep.current_task()
    for i in range(n):
        task.add_job(record, path, f"child{i}")
    _append(path, "parent")


def add_job_late(path: str) -> None:
    litemultistep.current_task().add_job(record, path, "late")


def exit_job() -> None:
    raise SystemExit(3)


async def async_record(path: str, tag: str) -> str:
    await asyncio.sleep(0.01)
    _append(path, f"{tag} {os.getpid()}")
    return tag


class Holder:
    @classmethod
    def cm(cls, path: str, tag: str) -> None:
        record(path, f"cm-{tag}")

    @staticmethod
    def sm(path: str, tag: str) -> None:
        record(path, f"sm-{tag}")

    def method(self) -> None:
        pass


def sleep_once(marker: str, path: str, tag: str, seconds: float) -> None:
    """Sleep the first time only (a marker file remembers), then record."""
    if not os.path.exists(marker):
        open(marker, "w").close()
        _append(path, f"start {tag} {os.getpid()}")
        time.sleep(seconds)
    record(path, tag)


def work(path: str, tag: str, seconds: float = 0.0) -> None:
    """A job that logs its start and its end, with its pid, around some work."""
    _append(path, f"start {tag} {os.getpid()}")
    if seconds:
        time.sleep(seconds)
    _append(path, f"end {tag} {os.getpid()}")


def victim(path: str, tag: str) -> None:
    """Like work, under another name: the crash hook picks its jobs out."""
    work(path, tag)


# -- misbehaving jobs: each tries to harm the worker that runs it ------------------------------------


def sleep_forever(path: str, tag: str) -> None:
    _append(path, f"start {tag} {os.getpid()} {time.time()}")
    time.sleep(10**6)


def spin_forever(path: str, tag: str) -> None:
    _append(path, f"start {tag} {os.getpid()} {time.time()}")
    while True:
        pass


def regex_forever(path: str, tag: str) -> None:
    """Holds the GIL in C for far longer than any limit (catastrophic backtracking)."""
    import re

    _append(path, f"start {tag} {os.getpid()} {time.time()}")
    re.match(r"(a+)+$", "a" * 64 + "b")


def deaf_sleeper(path: str, tag: str) -> None:
    """Ignores every stop signal it can, then sleeps."""
    import signal

    for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(s, signal.SIG_IGN)
    _append(path, f"start {tag} {os.getpid()} {time.time()}")
    time.sleep(10**6)


def exit_hard() -> None:
    os._exit(1)


def segfault() -> None:
    import ctypes

    ctypes.string_at(0)


def keyboard_interrupt() -> None:
    raise KeyboardInterrupt("raised by the job")


class NotAnException(BaseException):
    pass


def base_exception() -> None:
    raise NotAnException("a BaseException subclass")


class BrokenStr(Exception):
    def __str__(self) -> str:
        raise RuntimeError("no text for you")


def broken_str() -> None:
    raise BrokenStr()


def close_all_fds() -> None:
    os.closerange(3, 4096)


def crash_once(marker: str, path: str, tag: str) -> None:
    """Kills its process the first time (a marker file remembers), then records."""
    if not os.path.exists(marker):
        open(marker, "w").close()
        os._exit(9)
    record(path, tag)


def meddle() -> None:
    """Changes what the next jobs of the process would inherit."""
    import signal
    import sys

    os.chdir("/")
    os.environ["LITEMULTISTEP_TEST_LEAK"] = "leaked"
    sys.argv[0] = "changed"
    sys.argv.append("leaked")
    signal.signal(signal.SIGTERM, lambda *a: None)
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)


def surroundings(path: str, tag: str) -> None:
    """Records what a job sees of its process: directory, a variable, signal handlers, sys.argv."""
    import signal
    import sys

    _append(path, f"{tag}\t{os.getcwd()}\t{os.environ.get('LITEMULTISTEP_TEST_LEAK', '-')}\t"
                  f"{signal.getsignal(signal.SIGTERM)}\t{signal.getsignal(signal.SIGUSR1)}\t{sys.argv}")


def report_time_left(path: str) -> None:
    _append(path, f"left {litemultistep.time_left()}")


def burn(path: str, tag: str, seconds: float) -> None:
    """Busy CPU work for about ``seconds`` of process time, then a line: tag, pid, start, end."""
    start = time.time()
    cpu = time.process_time()
    x = 0
    while time.process_time() - cpu < seconds:
        x += 1
    _append(path, f"{tag} {os.getpid()} {start} {time.time()}")


def record_host(path: str, tag: str, seconds: float = 0.0) -> None:
    """Records which host ran it (a worker in its own UTS namespace has its own hostname)."""
    import socket

    time.sleep(seconds)
    _append(path, f"{tag} {socket.gethostname()}")


def double(path: str, i: int) -> int:
    """Returns 2 * i, and logs each run (a result must appear once, however often its job ran)."""
    _append(path, f"double {i}")
    return 2 * i


def double_after_failing_once(marker: str, i: int) -> int:
    fail_once(marker)
    return 2 * i


def returns_a_set() -> set[int]:
    return {1, 2}


def returns_a_huge_int() -> dict[str, list[int]]:
    """An int over Python's 4,300-digit limit on int-to-text conversion, which json.dumps obeys."""
    return {"n": [10**5000]}


def gather(path: str) -> None:
    """A finalizer that writes every result of its task, with the job ids and arguments, as JSON."""
    import json

    task = litemultistep.current_task()
    values = list(task.results())
    details = [[r.job_id, r.args, r.value] for r in task.job_results()]
    with open(path, "w") as f:
        json.dump({"values": values, "details": details}, f)


def reporting(path: str, steps: int, pause: float) -> None:
    """Reports its progress at every step (many calls: the worker stores the latest every 2 s)."""
    for i in range(steps):
        litemultistep.report(i + 1, steps)
        time.sleep(pause)
    _append(path, "reported")


def report_and_look(path: str) -> None:
    """Inline (sync mode, drain), a report is stored at once: the job sees it in its task's progress."""
    litemultistep.report(3, 10)
    p = litemultistep.current_task().progress()
    _append(path, f"{p.reported_done} {p.reported_total}")


def report_badly() -> None:
    litemultistep.report(5, 3)


def marked(path: str, tag: str, seconds: float) -> None:
    """A run that leaves its interval behind: ``start TAG RUN PID T``, a ``tick`` every 20 ms while it
    works, ``end`` when it is done (a run stopped on the way has no end; its last tick is near it)."""
    run = os.urandom(4).hex()
    _append(path, f"start {tag} {run} {os.getpid()} {time.time()}")
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        time.sleep(0.02)
        _append(path, f"tick {tag} {run} {os.getpid()} {time.time()}")
    _append(path, f"end {tag} {run} {os.getpid()} {time.time()}")


def marked_by_child(path: str, tag: str, seconds: float, session: bool) -> None:
    """Like :func:`marked`, but the ticks come from a child process it starts and waits for (in a
    session of its own if ``session``), under the job's run and pid: they show how long the child
    lived, whatever happened to the job."""
    import subprocess
    import sys

    run = os.urandom(4).hex()
    _append(path, f"start {tag} {run} {os.getpid()} {time.time()}")
    line = f"tick {tag} {run} {os.getpid()} "
    code = (f"import os, time\nend = time.monotonic() + {seconds!r}\nwhile time.monotonic() < end:\n"
            f"    time.sleep(0.02)\n    fd = os.open({path!r}, os.O_WRONLY | os.O_APPEND)\n"
            f"    os.write(fd, ({line!r} + repr(time.time()) + '\\n').encode())\n    os.close(fd)\n")
    subprocess.run([sys.executable, "-c", code], start_new_session=session, check=True)
    _append(path, f"end {tag} {run} {os.getpid()} {time.time()}")


class NulError(Exception):
    pass


NulError.__qualname__ = "Nul\x00Error"


def raise_nul() -> None:
    raise ValueError("bad\x00message")


def raise_nul_type() -> None:
    raise NulError("its type's name has a NUL")


def report_huge(path: str, marker: str) -> None:
    """Reports absurd numbers; once refused, the largest it may. Runs until ``marker`` exists."""
    try:
        litemultistep.report(1e308, 1e308)
    except litemultistep.InvalidSetting as e:
        _append(path, f"refused: {e}")
        litemultistep.report(10**15, 10**15)
    while not os.path.exists(marker):
        time.sleep(0.02)


class _Unprintable:
    def __repr__(self) -> str:
        raise RuntimeError("no repr for you")


def returns_an_unprintable() -> list:
    return [1, _Unprintable()]


class BadlyNamed(Exception):
    """An exception class whose name, once changed, is no valid text (a lone surrogate)."""


BadlyNamed.__qualname__ = "Badly\udcffNamed"


def raises_a_badly_named_exception() -> None:
    raise BadlyNamed("named badly")


def big_result(i: int, size: int) -> str:
    """A result of about ``size`` bytes that says which job it came from. It takes a few
    milliseconds, so that a job process sends each one on its own."""
    time.sleep(0.006)
    return f"{i:06d}" + "x" * size


def start_child(path: str, how: str, wait: bool = True) -> None:
    """Start a ``sleep`` that would outlive the job, write its pid to ``path``; then wait (or return
    at once, leaving it behind). ``how``: ``group`` (a plain child), ``session`` (a session of its own),
    ``daemon`` (double-forked: its parent exits at once, in a session of its own)."""
    import subprocess

    if how == "daemon":
        proc = subprocess.Popen(["sh", "-c", f"setsid sleep 600 & echo $! > {path}.tmp; mv {path}.tmp {path}"])
        proc.wait()
    else:
        child = subprocess.Popen(["sleep", "600"], start_new_session=how == "session")
        _append(path + ".tmp", str(child.pid))
        os.rename(path + ".tmp", path)
    while wait:
        time.sleep(1)


def thread_bomb(delay: float) -> None:
    """Leave a thread behind that kills whatever process it is in, ``delay`` seconds later."""
    import threading

    def boom() -> None:
        time.sleep(delay)
        os._exit(7)

    threading.Thread(target=boom, daemon=True).start()


def _attempt(counter: str) -> int:
    """This run's number, counted in a file: one line a run."""
    with open(counter, "a+") as f:
        f.seek(0)
        n = len(f.readlines()) + 1
        f.write(f"{n}\n")
    return n


def fail_with(counter: str, exc_name: str, times: int) -> None:
    """Raise the builtin exception ``exc_name`` the first ``times`` runs."""
    n = _attempt(counter)
    if n <= times:
        raise getattr(__import__("builtins"), exc_name)(f"run {n}")


def stop_a_child(path: str) -> None:
    """Starts a child, stops it with SIGTERM, and a fork pool with its terminate(): as in any process."""
    import multiprocessing
    import subprocess

    child = subprocess.Popen(["sleep", "30"])
    child.terminate()
    code = child.wait(10)
    with multiprocessing.get_context("fork").Pool(2) as pool:  # leaving it calls terminate()
        got = pool.map(abs, [-1, -2])
    record(path, f"child={code} pool={sum(got)}")


def pool_then_record(marker: str, path: str) -> None:
    """First run: starts a fork pool whose processes sleep, writes their pids, and sleeps. Later runs
    record ``again``."""
    import multiprocessing

    if os.path.exists(marker):
        record(path, "again")
        return
    open(marker, "w").close()
    pool = multiprocessing.get_context("fork").Pool(2)
    pool.map_async(time.sleep, [60, 60])
    _append(path, "pool " + " ".join(str(p.pid) for p in pool._pool))  # type: ignore[attr-defined]
    time.sleep(60)


def slow_fail(counter: str, seconds: float) -> None:
    """Counts its run, sleeps, then raises ValueError."""
    _attempt(counter)
    time.sleep(seconds)
    raise ValueError("slow and failing")


def crash_then_fail(counter: str) -> None:
    """Kills its process on its first run, then raises ValueError on every run after it."""
    if _attempt(counter) == 1:
        os._exit(9)
    raise ValueError("always")


def ask_to_retry(counter: str, times: int, delay: float | None = None) -> None:
    """Ask for a retry (litemultistep.Retry) the first ``times`` runs."""
    if _attempt(counter) <= times:
        raise litemultistep.Retry(delay=delay)


def run_a_child(path: str, tag: str) -> None:
    """Runs a short child and records how it ended (waitpid fails where SIGCHLD is ignored)."""
    import subprocess

    _append(path, f"{tag} {subprocess.run(['sh', '-c', 'exit 5'], check=False).returncode}")


def record_flags(path: str, tag: str) -> None:
    """Records the interpreter's options that change how code runs (-O, -X dev)."""
    import sys

    _append(path, f"{tag} {sys.flags.optimize} {sys.flags.dev_mode}")


def print_everywhere(path: str, tag: str) -> None:
    """Writes to standard output and error, then records (they may be /dev/null, never closed)."""
    import sys

    print("to stdout")
    print("to stderr", file=sys.stderr)
    os.write(1, b"fd 1\n")
    os.write(2, b"fd 2\n")
    record(path, tag)


def silence_stderr(path: str, tag: str) -> None:
    """Points standard error at /dev/null, as a quiet job may, then records."""
    null = os.open(os.devnull, os.O_WRONLY)
    os.dup2(null, 2)
    os.close(null)
    record(path, tag)
