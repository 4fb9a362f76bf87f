#!/usr/bin/env python3
"""Benchmark litemultistep on this machine, optionally side by side with huey's SqliteHuey.

    python scripts/bench.py                  # the full run (a few minutes)
    python scripts/bench.py --quick          # a smoke run (seconds)
    python scripts/bench.py --compare huey   # also huey, same workloads, same run (pip install -e '.[bench]')
    python scripts/bench.py --only cpu       # CPU-bound jobs against two plain processes
    python scripts/bench.py --only memory    # the worker's memory, idle and over two long drains
    python scripts/bench.py --web            # the web page: page times with 10,000 tasks, and the
                                             # drain with 20 pages watching live
    python scripts/bench.py --compare celery --compare rq [--db URL]
                                             # fan out then finalize, against Celery's chord and RQ's
                                             # depends_on (local RabbitMQ and Redis), litemultistep on
                                             # SQLite (and on PostgreSQL with --db)
    python scripts/bench.py --db postgresql://postgres@127.0.0.1/test [--compare procrastinate]
                                             # the PostgreSQL backend (a throwaway schema per run), and
                                             # procrastinate on the same server, same run

Every figure is printed as a Markdown table: the median of the runs, with min-max. Drain rates are
steady-state: jobs finished per second between 5% and 95% done, so process start-up (the same for
any queue) does not count.
"""

from __future__ import annotations

import argparse
import compileall
import json
import os
import platform
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)


#: a checkout whose litemultistep the --baseline drains use instead of this one
BASELINE: list[str] = []


def child_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (*BASELINE, HERE, env.get("PYTHONPATH", "")) if p)
    env.pop("LITEMULTISTEP_DB", None)
    env.update(extra)
    return env


@dataclass
class Figure:
    name: str
    unit: str
    values: list[float] = field(default_factory=list)
    note: str = ""

    def cell(self) -> str:
        if not self.values:
            return "-"
        med = statistics.median(self.values)
        fmt = _fmt(med)
        if len(self.values) > 1:
            return f"{fmt} ({_fmt(min(self.values))}-{_fmt(max(self.values))})"
        return fmt


def recorder(figures: list[Figure]) -> Callable[..., Figure]:
    """``add(name, unit, values, note="")``: keep a figure, and show it at once on standard error."""

    def add(name: str, unit: str, values: list[float], note: str = "") -> Figure:
        f = Figure(name, unit, values, note)
        figures.append(f)
        print(f"  {name}: {f.cell()} {unit}", file=sys.stderr, flush=True)
        return f

    return add


def _fmt(x: float) -> str:
    if x >= 100:
        return f"{x:,.0f}"
    if x >= 1:
        return f"{x:.2f}"
    return f"{x:.3f}"


def steady_rate(samples: list[tuple[float, int]], total: int) -> float:
    """Jobs per second between 5% and 95% done, interpolated from (time, done) samples."""
    def when(target: float) -> float:
        for (t0, d0), (t1, d1) in zip(samples, samples[1:], strict=False):
            if d0 <= target <= d1 and d1 > d0:
                return t0 + (t1 - t0) * (target - d0) / (d1 - d0)
        raise RuntimeError("the samples do not cover the drain")
    lo, hi = 0.05 * total, 0.95 * total
    return (hi - lo) / (when(hi) - when(lo))


def _proc_kb(pid: int, name: str, field: str) -> int:
    """The kB figure a line ``field`` of /proc/PID/``name`` gives (0 once the process is gone)."""
    try:
        with open(f"/proc/{pid}/{name}") as f:
            for line in f:
                if line.startswith(field):
                    return int(line.split()[1])
    except FileNotFoundError:
        pass
    return 0


def rss_kb(pid: int) -> int:
    return _proc_kb(pid, "status", "VmRSS:")


def pss_kb(pid: int) -> int:
    """The proportional set size of ``pid``: its resident pages, each shared page divided among the
    processes that share it (a job process forked from its worker shares most of its pages)."""
    return _proc_kb(pid, "smaps_rollup", "Pss:")


def children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(p) for p in f.read().split()]
    except FileNotFoundError:
        return []


def cpu_seconds(pid: int) -> float:
    """CPU time of every thread of ``pid``, to the nanosecond (Linux schedstat)."""
    total = 0
    for tid in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
            total += int(f.read().split()[0])
    return total / 1e9


# -- litemultistep ----------------------------------------------------------------------------------


def fill(db: str, n: int, synchronous: str = "normal", tasks: int = 1) -> tuple[float, float]:
    """Create ``tasks`` tasks of ``n`` no-op jobs in all, each in one ``with`` block, in a fresh process.
    Returns (jobs per second, peak RSS of that process in MB)."""
    code = textwrap.dedent(f"""
        import resource, time
        import bench_jobs
        from litemultistep import MultiStepTask
        t = time.perf_counter()
        for k in range({tasks}):
            with MultiStepTask.create("bench", db={db!r}) as task:
                for i in range({n // tasks}):
                    task.add_job(bench_jobs.noop, i)
        print(time.perf_counter() - t, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env=child_env(LITEMULTISTEP_SYNCHRONOUS=synchronous))
    seconds, maxrss = out.stdout.split()
    return n / float(seconds), int(maxrss) / 1024


_pg_readers: dict[str, Any] = {}


def completed(db: str) -> int:
    if db.startswith("postgresql://"):
        import psycopg

        # one connection, kept: a new one 50 times a second would load the server more than the drain
        pg = _pg_readers.get(db)
        if pg is None:
            pg = _pg_readers[db] = psycopg.connect(db, autocommit=True)
        row = pg.execute("SELECT coalesce(sum(completed_count), 0) FROM task").fetchone()
        done = pg.execute("SELECT coalesce(sum(normal_count + finalize_count), 0) FROM finished_task").fetchone()
        return int(row[0]) + int(done[0])
    conn = sqlite3.connect(db, timeout=30)
    try:
        row = conn.execute("SELECT coalesce(sum(completed_count), 0) FROM task").fetchone()
        done = conn.execute("SELECT coalesce(sum(normal_count + finalize_count), 0) FROM finished_task").fetchone()
        return int(row[0]) + int(done[0])
    finally:
        conn.close()


def drain(db: str, n: int, synchronous: str = "normal", memory: list[float] | None = None,
          concurrency: int = 2, quiet: bool = True) -> float:
    """Run ``litemultistep worker DB -c 2 --burst -q`` on ``n`` queued jobs; steady-state jobs/s.
    (``quiet=False``: at the default log level, as most people run it.)"""
    proc = subprocess.Popen([sys.executable, "-m", "litemultistep", "worker", db, "-c", str(concurrency), "--burst",
                             *(["-q"] if quiet else [])],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env=child_env(LITEMULTISTEP_SYNCHRONOUS=synchronous))
    samples = [(time.monotonic(), 0)]
    rss_at: dict[str, float] = {}
    while proc.poll() is None:
        done = completed(db)
        samples.append((time.monotonic(), done))
        if memory is not None:
            for label, frac in (("10%", 0.1), ("90%", 0.9)):
                if label not in rss_at and done >= frac * n:
                    procs = [proc.pid, *children(proc.pid)]  # the worker and its job processes
                    rss_at[label] = max((rss_kb(k) for k in procs), default=0) / 1024
        time.sleep(0.02)
    samples.append((time.monotonic(), completed(db)))
    if proc.returncode != 0:
        raise RuntimeError(f"worker exited {proc.returncode}")
    if memory is not None:
        memory.extend([rss_at.get("10%", 0.0), rss_at.get("90%", 0.0)])
    return steady_rate(samples, n)


def finalization_latency(tmp: str, jobs: int, db: str | None = None) -> float:
    """Milliseconds from the last normal job running to the first finalizer running."""
    db = db or tmp + "/fin.sqlite"
    code = textwrap.dedent(f"""
        import bench_jobs
        from litemultistep import MultiStepTask
        with MultiStepTask.create("fin", db={db!r}) as task:
            for i in range({jobs}):
                task.add_job(bench_jobs.stamp, {tmp + '/fin.log'!r}, "n")
            task.add_finalization_job(bench_jobs.stamp, {tmp + '/fin.log'!r}, "F")
    """)
    subprocess.run([sys.executable, "-c", code], check=True, env=child_env())
    subprocess.run([sys.executable, "-m", "litemultistep", "worker", db, "-c", "2", "--burst", "-q"], check=True,
                   env=child_env())
    with open(tmp + "/fin.log") as f:
        rows = [line.split() for line in f]
    os.remove(tmp + "/fin.log")
    last_job = max(float(t) for tag, t in rows if tag == "n")
    final = min(float(t) for tag, t in rows if tag == "F")
    return (final - last_job) * 1000


def server_pids(db: str) -> list[int]:
    """The PostgreSQL backends serving litemultistep's connections (the server runs on this machine)."""
    if not db.startswith("postgresql://"):
        return []
    import psycopg

    with psycopg.connect(db, autocommit=True) as pg:
        rows = pg.execute("SELECT pid FROM pg_stat_activity WHERE application_name = 'litemultistep' "
                          "AND pid <> pg_backend_pid()").fetchall()
    return [int(pid) for (pid,) in rows]


def idle(tmp: str, seconds: float, pickups: int, db: str | None = None,
         workers: int = 1) -> tuple[float, list[float]]:
    """CPU share of ``workers`` idle workers (their job processes and, on PostgreSQL, their server
    backends included), and milliseconds from a commit to its job starting."""
    import bench_jobs

    from litemultistep import MultiStepTask

    db = db or tmp + "/idle.sqlite"
    log = tmp + "/idle.log"
    MultiStepTask.create("warm", db=db).nuke()
    procs = [subprocess.Popen([sys.executable, "-m", "litemultistep", "worker", db, "-q"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=child_env())
             for _ in range(workers)]

    def cpu() -> float:
        pids = [p.pid for p in procs] + [c for p in procs for c in children(p.pid)] + server_pids(db)
        return sum(cpu_seconds(pid) for pid in pids if os.path.exists(f"/proc/{pid}"))

    from litemultistep.views import workers as registered

    try:
        while len(registered(db)) < workers:  # all started (on 2 cores, twenty take a while)
            time.sleep(0.2)
        time.sleep(3.0)  # and their job processes too, and settled
        c0, t0 = cpu(), time.monotonic()
        time.sleep(seconds)
        share = (cpu() - c0) / (time.monotonic() - t0)
        latencies = []
        for i in range(pickups):
            with MultiStepTask.create("pick", db=db) as task:
                task.add_job(bench_jobs.stamp, log, f"p{i}")
                # the commit comes next: taken after it, a job already started could come out ahead
                # of its own commit; taken here, the figure counts the commit's own time too
                committed = time.time()
            while True:
                try:
                    with open(log) as f:
                        rows = dict(line.split() for line in f)
                except FileNotFoundError:
                    rows = {}
                if f"p{i}" in rows:
                    latencies.append((float(rows[f"p{i}"]) - committed) * 1000)
                    break
                time.sleep(0.005)
            time.sleep(0.3)  # idle again, polling
    finally:
        for p in procs:
            p.send_signal(signal.SIGTERM)
        for p in procs:
            p.wait(30)
        if os.path.exists(log):
            os.remove(log)
    return share, latencies


def progress_read_us(db: str, reads: int = 1000) -> float:
    from litemultistep import MultiStepTask
    from litemultistep.db import open_database
    from litemultistep.views import active_tasks

    database = open_database(db)
    task = MultiStepTask(active_tasks(database)[0].task_id, database)
    times = []
    for _ in range(reads):
        t = time.perf_counter()
        task.progress()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e6


def file_kb(db: str) -> float:
    return sum(os.path.getsize(p) for p in (db, db + "-wal") if os.path.exists(p)) / 1024


# -- real jobs --------------------------------------------------------------------------------------


def enqueue(db: str, calls: list[tuple[str, list[object]]], timeout: float | None = None) -> float:
    """One task of ``calls`` (bench_jobs function name, arguments), in a fresh process; returns the
    wall time of the commit."""
    code = textwrap.dedent(f"""
        import json, sys, time, bench_jobs
        from litemultistep import MultiStepTask
        calls = json.load(sys.stdin)
        with MultiStepTask.create("real", db={db!r}, timeout={timeout!r}) as task:
            for name, args in calls:
                task.add_job(getattr(bench_jobs, name), *args)
        print(time.time())
    """)
    out = subprocess.run([sys.executable, "-c", code], input=json.dumps(calls), capture_output=True, text=True,
                         check=True, env=child_env())
    return float(out.stdout)


def wait_done(db: str, total: int) -> float:
    while completed(db) < total:
        time.sleep(0.005)
    return time.time()


def into_idle_pool(db: str, concurrency: int, calls: list[tuple[str, list[object]]], idle_first: float) -> float:
    """Seconds from the commit of a task to its last job, run by an idle ``-c N`` pool."""
    from litemultistep import Database

    Database(db)
    proc = subprocess.Popen([sys.executable, "-m", "litemultistep", "worker", db, "-c", str(concurrency), "-q"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=child_env())
    try:
        time.sleep(idle_first)  # idle for a while first: the pool must not have grown greedy meanwhile
        committed = enqueue(db, calls)
        return wait_done(db, len(calls)) - committed
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)


def burst_seconds(db: str, concurrency: int, calls: list[tuple[str, list[object]]],
                  timeout: float | None = None) -> float:
    """Wall seconds of ``worker -c N --burst`` over a task of ``calls``, start-up included."""
    enqueue(db, calls, timeout)
    t = time.monotonic()
    subprocess.run([sys.executable, "-m", "litemultistep", "worker", db, "-c", str(concurrency), "--burst", "-q"],
                   check=True, env=child_env())
    return time.monotonic() - t


def sha_rounds(seconds: float = 0.01) -> int:
    """Rounds of :func:`bench_jobs.sha` that take about ``seconds`` of CPU here (the best of five)."""
    import bench_jobs

    best = min(_cpu_of(lambda: bench_jobs.sha(2000)) for _ in range(5))
    return max(1, round(2000 * seconds / best))


def _cpu_of(fn: Callable[[], object]) -> float:
    t = time.thread_time()
    fn()
    return time.thread_time() - t


def _spent(log: str) -> float:
    """The CPU seconds the calls of :func:`bench_jobs.sha_cpu` wrote to ``log`` (then removed)."""
    with open(log) as f:
        total = sum(float(line) for line in f)
    os.remove(log)
    return total


def plain_pair(tmp: str, n: int, rounds: int) -> tuple[float, float]:
    """Two plain Python processes running ``n / 2`` calls of sha(rounds) each, started together:
    (wall seconds until both have exited, CPU seconds the calls took)."""
    log = f"{tmp}/pair-{time.monotonic_ns()}.log"
    code = f"import bench_jobs\nfor _ in range({n // 2}): bench_jobs.sha_cpu({rounds}, {log!r})"
    t = time.monotonic()
    procs = [subprocess.Popen([sys.executable, "-c", code], env=child_env()) for _ in range(2)]
    for proc in procs:
        if proc.wait() != 0:
            raise RuntimeError("a plain process failed")
    return time.monotonic() - t, _spent(log)


def worker_pair(tmp: str, n: int, rounds: int) -> tuple[float, float]:
    """``worker -c 2 --burst -q`` over one task of ``n`` calls of sha(rounds), start-up included:
    (wall seconds, CPU seconds the calls took)."""
    db = f"{tmp}/cpu-{time.monotonic_ns()}.sqlite"
    log = db + ".log"
    return burst_seconds(db, 2, [("sha_cpu", [rounds, log])] * n), _spent(log)


def cpu_vs_pair(tmp: str, n: int, runs: int, rounds: int) -> tuple[list[float], list[float], list[float]]:
    """``runs`` rounds of :func:`plain_pair` and :func:`worker_pair`, back to back, their order
    alternating. Returns the wall ratios (worker / pair) of each round, the same with each side's wall
    time divided by the CPU its calls took (the machine ran the same calls faster in some runs than in
    others: this takes that out), and the worker's wall times."""
    raw, normalized, walls = [], [], []
    for i in range(runs):
        sides = [plain_pair, worker_pair] if i % 2 == 0 else [worker_pair, plain_pair]
        got = {side: side(tmp, n, rounds) for side in sides}
        (p_wall, p_cpu), (w_wall, w_cpu) = got[plain_pair], got[worker_pair]
        raw.append(w_wall / p_wall)
        normalized.append((w_wall / w_cpu) / (p_wall / p_cpu))
        walls.append(w_wall)
    return raw, normalized, walls


def memory_run(tmp: str, n: int, rounds_of: int = 2) -> dict[str, tuple[list[float], list[float]]]:
    """Resident sizes (MB) of an idle ``worker -c 2`` and of each of its job processes, RSS then PSS;
    then the same after each of ``rounds_of`` tasks of ``n`` jobs (one in a hundred fails), drained by
    that worker."""
    db = f"{tmp}/memory-{time.monotonic_ns()}.sqlite"
    from litemultistep import Database

    Database(db).close()
    proc = subprocess.Popen([sys.executable, "-m", "litemultistep", "worker", db, "-c", "2", "-q"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=child_env())
    sizes: dict[str, tuple[list[float], list[float]]] = {}

    def measure(label: str) -> None:
        pids = [proc.pid, *sorted(children(proc.pid))]
        sizes[label] = ([rss_kb(p) / 1024 for p in pids], [pss_kb(p) / 1024 for p in pids])

    try:
        time.sleep(2.0)
        measure("idle")
        calls: list[tuple[str, list[object]]] = [("boom", [i]) if i % 100 == 99 else ("noop", [i]) for i in range(n)]
        for k in range(rounds_of):
            enqueue(db, calls)
            while _finished_or_failed(db) < n * (k + 1):
                time.sleep(0.05)
            time.sleep(1.0)
            measure(f"after {n * (k + 1):,} jobs")
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
    return sizes


def cpu_and_memory(tmp: str, quick: bool, runs: int, which: set[str], add: Callable[..., Figure],
                   ratios: list[str]) -> None:
    """CPU-bound jobs against a plain pair of processes, and the worker's memory (``which``)."""
    if "cpu" in which:
        rounds = sha_rounds()
        for n in ((60,) if quick else (300, 1200)):
            raw, normalized, walls = cpu_vs_pair(tmp, n, max(runs, 2 if quick else 6), rounds)
            add(f"{n} CPU-bound jobs of ~10 ms (sha256), worker -c 2 --burst, start-up included", "s", walls)
            add(f"the same / two plain processes running {n // 2} calls each, run by run", "x", raw,
                "every run: " + " ".join(f"{r:.2f}" for r in raw))
            add("the same, each side's wall time per CPU second of its calls", "x", normalized,
                "every run: " + " ".join(f"{r:.2f}" for r in normalized))
            ratios.append(f"{n} CPU-bound jobs, -c 2 / a plain pair: worst run {max(raw):.2f}x "
                          f"(by the calls' own CPU time: {max(normalized):.2f}x)")
    if "memory" in which:
        n = 5_000 if quick else 100_000
        rounds = 2 if quick else 4
        sizes = memory_run(tmp, n, rounds)
        for label, (mb, pss) in sizes.items():
            add(f"RSS of worker -c 2 / its job processes, {label}", "MB", [mb[0]],
                "job processes: " + ", ".join(f"{m:.1f}" for m in mb[1:]) + " MB; PSS: worker "
                + ", job processes ".join([f"{pss[0]:.1f}", ", ".join(f"{m:.1f}" for m in pss[1:])]) + " MB")
        first, last = list(sizes.values())[1][0], list(sizes.values())[-1][0]
        ratios.append(f"memory from {n:,} to {n * rounds:,} jobs: worker {last[0] - first[0]:+.1f} MB, job processes "
                      + ", ".join(f"{b - a:+.1f}" for a, b in zip(first[1:], last[1:], strict=False)) + " MB")


def _finished_or_failed(db: str) -> int:
    conn = sqlite3.connect(db, timeout=30)
    try:
        row = conn.execute("SELECT coalesce(sum(completed_count + failed_count), 0) FROM task").fetchone()
        return int(row[0])
    finally:
        conn.close()


def burst_exit_ms(tmp: str) -> float:
    """Milliseconds from the last job's run to the exit of ``worker -c 2 --burst``."""
    db, log = f"{tmp}/exit-{time.monotonic_ns()}.sqlite", f"{tmp}/exit.log"
    enqueue(db, [("stamp", [log, "n"])] * 200)
    subprocess.run([sys.executable, "-m", "litemultistep", "worker", db, "-c", "2", "--burst", "-q"], check=True,
                   env=child_env())
    exited = time.time()
    with open(log) as f:
        last = max(float(line.split()[1]) for line in f)
    os.remove(log)
    return (exited - last) * 1000


def isolation_us(tmp: str, n: int) -> tuple[float, float]:
    """CPU µs per no-op job spent by the worker process (claims, results, handing jobs over) and by
    its job process (running them), with ``worker -c 1``, start-up excluded."""
    db = f"{tmp}/iso-{time.monotonic_ns()}.sqlite"
    enqueue(db, [("noop", [i]) for i in range(n)])
    proc = subprocess.Popen([sys.executable, "-m", "litemultistep", "worker", db, "-q"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=child_env())
    while completed(db) < n // 10:
        time.sleep(0.002)
    kids = children(proc.pid)
    w0, k0, d0 = cpu_seconds(proc.pid), sum(cpu_seconds(k) for k in kids), completed(db)
    while completed(db) < n * 9 // 10:
        time.sleep(0.002)
    w1, k1, d1 = cpu_seconds(proc.pid), sum(cpu_seconds(k) for k in kids), completed(db)
    proc.send_signal(signal.SIGTERM)
    proc.wait(60)
    return (w1 - w0) / (d1 - d0) * 1e6, (k1 - k0) / (d1 - d0) * 1e6


# -- huey -------------------------------------------------------------------------------------------


def procrastinate_run(url: str, n: int, concurrency: int) -> tuple[float, float]:
    """procrastinate on the same server, in a database of its own (made and dropped here): enqueue
    ``n`` no-op jobs in one batch, then drain them with ``worker --one-shot -c N``. Returns (enqueue
    jobs/s, drain jobs/s with start-up included)."""
    import psycopg
    from psycopg.conninfo import conninfo_to_dict, make_conninfo

    name = f"lms_bench_procrastinate_{os.getpid()}"
    with psycopg.connect(url, autocommit=True) as admin:
        admin.execute(f"CREATE DATABASE {name}")
    conninfo = make_conninfo(url, dbname=name, **{k: v for k, v in conninfo_to_dict(url).items() if k == "options"})
    env = child_env(BENCH_PROCRASTINATE_DB=conninfo)
    app = ["-m", "procrastinate", "--app=bench_procrastinate_app.app", "--log-level", "warning"]
    try:
        subprocess.run([sys.executable, *app, "schema", "--apply"], check=True, env=env, capture_output=True)
        code = textwrap.dedent(f"""
            import time, bench_procrastinate_app as b
            with b.app.open():
                t = time.perf_counter()
                b.noop.batch_defer(*[{{"i": i}} for i in range({n})])
                print(time.perf_counter() - t)
        """)
        out = subprocess.run([sys.executable, "-c", code], check=True, env=env, capture_output=True, text=True)
        t = time.monotonic()
        subprocess.run([sys.executable, *app, "worker", "--one-shot", "-c", str(concurrency), "--delete-jobs",
                        "successful"], check=True, env=env, capture_output=True)
        return n / float(out.stdout), n / (time.monotonic() - t)
    finally:
        with psycopg.connect(url, autocommit=True) as admin:
            admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


def burst_wall(db: str, n: int, concurrency: int) -> float:
    """Jobs/s of ``worker -c N --burst`` over ``n`` queued no-op jobs, start-up included."""
    t = time.monotonic()
    subprocess.run([sys.executable, "-m", "litemultistep", "worker", db, "-c", str(concurrency), "--burst", "-q"],
                   check=True, env=child_env())
    return n / (time.monotonic() - t)


def postgres_run(url: str, quick: bool, runs: int, compare: list[str],
                 add: Callable[..., Figure], ratios: list[str]) -> None:
    """The PostgreSQL workloads, each in a throwaway schema of the database at ``url``."""
    from litemultistep.pg import temporary_schema

    n = 5_000 if quick else 100_000
    med = statistics.median

    def in_schema(fn: Callable[[str], float]) -> float:
        with temporary_schema(url, prefix="lms_bench") as db:
            try:
                return fn(db)
            finally:
                reader = _pg_readers.pop(db, None)
                if reader is not None:
                    reader.close()

    def fill_and_drain(db: str, c: int) -> float:
        fill(db, n)
        return drain(db, n, concurrency=c)

    rates = {}
    for c in (2, 8):
        rates[c] = add(f"PostgreSQL drain, {n:,} no-op jobs, worker -c {c} --burst", "jobs/s",
                       [in_schema(lambda db, c=c: fill_and_drain(db, c)) for _ in range(runs)])
    ratios.append(f"PostgreSQL drain, -c 8 / -c 2 on {os.cpu_count()} cores: "
                  f"{med(rates[8].values) / med(rates[2].values):.2f}")

    def spread_drain(db: str) -> float:
        fill(db, n, tasks=8)
        return drain(db, n, concurrency=8)

    spread = add(f"PostgreSQL drain, {n:,} no-op jobs in 8 tasks, worker -c 8 --burst", "jobs/s",
                 [in_schema(spread_drain) for _ in range(runs)])
    ratios.append(f"the hot task row: -c 8 on one task / on 8 tasks of the same jobs: "
                  f"{med(rates[8].values) / med(spread.values):.2f}")
    add(f"PostgreSQL enqueue, {n:,} jobs in one with block", "jobs/s",
        [in_schema(lambda db: fill(db, n)[0]) for _ in range(runs)])
    with tempfile.TemporaryDirectory(prefix="lms-bench-") as tmp:
        add("PostgreSQL finalization: last job run -> first finalizer run", "ms",
            [in_schema(lambda db: finalization_latency(tmp, 200, db)) for _ in range(3 if quick else 10)])
        idle_workers = 20
        share, pickups = 0.0, []

        def idle_run(db: str) -> float:
            nonlocal share, pickups
            share, pickups = idle(tmp, 2.0 if quick else 10.0, 5 if quick else 20, db, idle_workers)
            return share

        in_schema(idle_run)
        add(f"PostgreSQL, {idle_workers} idle workers: CPU of them all, their server backends included", "% of a core",
            [share * 100], "all threads, from /proc schedstat")
        add(f"PostgreSQL, {idle_workers} idle workers: commit -> job start", "ms", pickups,
            f"max {max(pickups):.1f} ms")
    if "procrastinate" in compare:
        pn = 2_000 if quick else 20_000
        ours = [in_schema(lambda db: (fill(db, pn), burst_wall(db, pn, 2))[1]) for _ in range(runs)]
        theirs = [procrastinate_run(url, pn, 2) for _ in range(runs)]
        add(f"litemultistep drain, {pn:,} no-op jobs, worker -c 2 --burst (start-up included)", "jobs/s", ours)
        add(f"procrastinate drain, {pn:,} no-op jobs, worker --one-shot -c 2 (start-up included)", "jobs/s",
            [d for _, d in theirs])
        add(f"procrastinate enqueue, {pn:,} jobs in one batch_defer", "jobs/s", [e for e, _ in theirs])
        ratios.append(f"drain on PostgreSQL, litemultistep / procrastinate = "
                      f"{med(ours) / med(d for _, d in theirs):.1f}x")


def huey_run(tmp: str, n: int, fsync: str) -> tuple[float, float]:
    """huey's SqliteHuey, consumer ``-k process -w 2``: (enqueue one by one /s, steady drain /s)."""
    db = f"{tmp}/huey-{fsync}-{time.monotonic_ns()}.sqlite"
    env = child_env(BENCH_HUEY_DB=db, BENCH_HUEY_FSYNC=fsync)
    code = textwrap.dedent(f"""
        import time
        from bench_huey_app import noop
        t = time.perf_counter()
        for i in range({n}):
            noop(i)
        print(time.perf_counter() - t)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env)
    enqueue = n / float(out.stdout)

    def remaining() -> int:
        conn = sqlite3.connect(db, timeout=30)
        try:
            return int(conn.execute("SELECT count(*) FROM task").fetchone()[0])
        finally:
            conn.close()

    proc = subprocess.Popen([sys.executable, "-m", "huey.bin.huey_consumer", "bench_huey_app.huey", "-k", "process",
                             "-w", "2", "-q"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    samples = [(time.monotonic(), 0)]
    try:
        while True:
            left = remaining()
            samples.append((time.monotonic(), n - left))
            if left == 0:
                break
            time.sleep(0.02)
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
    return enqueue, steady_rate(samples, n)


def _limited_drain(db: str, n: int) -> float:
    enqueue(db, [("noop", [i]) for i in range(n)], timeout=60.0)
    return drain(db, n)


def _kept_drain(db: str, n: int) -> float:
    """The no-op drain, its task keeping results (each job returns its argument)."""
    code = textwrap.dedent(f"""
        import bench_jobs
        from litemultistep import MultiStepTask
        with MultiStepTask.create("kept", db={db!r}, keep_results=True) as task:
            for i in range({n}):
                task.add_job(bench_jobs.echo, i)
    """)
    subprocess.run([sys.executable, "-c", code], check=True, env=child_env())
    return drain(db, n)


def results_read(db: str, n: int) -> tuple[float, float]:
    """Results per second streamed by ``task.results()`` from a task of ``n`` stored results, and the
    growth of the reading process's peak RSS meanwhile (MB). The results are stored through the engine
    (add, claim, record), without worker processes, to keep the set-up short."""
    code = textwrap.dedent(f"""
        import json, resource, time
        from litemultistep import Database, MultiStepTask
        from litemultistep import engine as E
        from litemultistep.db import JobKind
        db = Database({db!r})
        task = MultiStepTask.create("read", db=db, keep_results=True)
        for start in range(0, {n}, 20000):
            E.add_jobs(db, task.task_id, [(JobKind.NORMAL, "bench_jobs:echo", json.dumps([[i], {{}}]), None)
                                          for i in range(start, min(start + 20000, {n}))])
        w, _ = db.register_worker("inline")
        with db.write() as c:
            c.execute("UPDATE task SET avg_duration = 1e-9")  # as if its jobs were instant: big claims
        while batches := E.claim(db, w, max_batch=20000, wants=1):
            done = [E.Done(b[0].task_pk, b[0].task_id, [j.id for j in b], 0.0, [str(j.id) for j in b])
                    for b in batches]
            E.claim(db, w, done=done, wants=0)
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        t = time.perf_counter()
        count = sum(1 for _ in task.results())
        took = time.perf_counter() - t
        assert count == {n}, count
        print({n} / took, (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024)
    """)
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True, env=child_env())
    rate, grew = out.stdout.split()
    return float(rate), float(grew)


def claim_us(db: str, tasks: int, at_limit: bool, claims: int = 2000) -> float:
    """Median µs of one claim (its transaction included) with ``tasks`` tasks waiting, each with queued
    jobs; with ``at_limit`` each of them already runs as many jobs as its ``max_running`` allows and
    one more task, last served, has room: the claim must find it past the others. Through the engine
    in one process (a claim a worker makes, without the worker around it)."""
    limited = ", max_running=1" if at_limit else ""
    code = textwrap.dedent(f"""
        import json, statistics, time
        from litemultistep import Database, MultiStepTask
        from litemultistep import engine as E
        from litemultistep.db import JobKind
        db = Database({db!r})
        w, _ = db.register_worker("inline")
        job = (JobKind.NORMAL, "bench_jobs:noop", json.dumps([[], {{}}]), None)
        for i in range({tasks}):
            task = MultiStepTask.create("t", db=db{limited})
            E.add_jobs(db, task.task_id, [job] * 3)
            task.mark_finalizable()
            if {at_limit!r}:
                E.claim(db, w, max_batch=1)  # its one running job: at its limit from now on
        free = MultiStepTask.create("free", db=db)
        E.add_jobs(db, free.task_id, [job] * 3)
        free.mark_finalizable()
        took = []
        for _ in range({claims}):
            t = time.perf_counter()
            [batch] = E.claim(db, w, max_batch=1)
            took.append(time.perf_counter() - t)
            E.claim(db, w, give_back=[j.id for j in batch], wants=0)
        print(statistics.median(took) * 1e6)
    """)
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True, env=child_env())
    return float(out.stdout.split()[-1])


# -- fan out, then finalize: against Celery's chord and RQ's depends_on ------------------------------


def _answers(host: str, port: int) -> bool:
    import socket

    try:
        socket.create_connection((host, port), timeout=2).close()
    except OSError:
        return False
    return True


def _until_marked(path: str, timeout: float) -> tuple[float, str]:
    """When the finalizer stamped ``path`` (wall clock), and what it said."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if os.path.exists(path):
            with open(path) as f:
                words = f.read().split()
            if len(words) == 2:  # else the finalizer is writing it right now
                tag, at = words
                return float(at), tag
        time.sleep(0.005)
    raise RuntimeError(f"no finalizer ran within {timeout:g} s")


def _stop(procs: list[subprocess.Popen[bytes]]) -> None:
    for p in procs:
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        p.wait()


def _fan_out(client: str, path: str, n: int, env: dict[str, str], timeout: float) -> float:
    """Run ``client`` (it prints the wall-clock time just before its first add), then wait for the
    finalizer's stamp: seconds from the first add to the finalizer's end, checked to follow ``n`` jobs."""
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(client)], check=True, capture_output=True, text=True,
                         env=env, cwd=HERE)
    began = float(out.stdout.split()[-1])
    at, tag = _until_marked(path, timeout)
    if tag != f"final-{n}":
        raise RuntimeError(f"the finalizer followed {tag.split('-')[1]} jobs, not {n}")
    return at - began


def _job(kind: str) -> tuple[str, str]:
    """The job's name and its arguments after ``i``, in Python."""
    return ("noop", "") if kind == "noop" else ("burn_job", ", 0.01")


def fanout_litemultistep(tmp: str, n: int, kind: str, db: str | None = None) -> float:
    """``n`` jobs fanned out in one with block, then one finalizer, into an idle ``worker -c 2``."""
    target = db or f"{tmp}/fanout-{time.monotonic_ns()}.sqlite"
    path = f"{tmp}/final-{time.monotonic_ns()}"
    from litemultistep import Database

    Database(target).close()
    worker = subprocess.Popen([sys.executable, "-m", "litemultistep", "worker", target, "-c", "2", "-q"],
                              env=child_env(), start_new_session=True)
    try:
        time.sleep(1.0)  # started and idle
        name, more = _job(kind)
        return _fan_out(f"""
            import time, bench_jobs
            from litemultistep import MultiStepTask
            began = time.time()
            with MultiStepTask.create("fanout", db={target!r}) as task:
                for i in range({n}):
                    task.add_job(bench_jobs.{name}, i{more})
                task.add_finalization_job(bench_jobs.final, {path!r})
            print(began)
        """, path, n, child_env(), 600)
    finally:
        _stop([worker])


def fanout_celery(tmp: str, n: int, kind: str, broker: str, backend: str) -> float:
    """Celery's chord: ``n`` jobs in a group, the finalizer its callback; ``celery worker -c 2``
    (prefork), started and idle."""
    path = f"{tmp}/final-{time.monotonic_ns()}"
    env = child_env(BENCH_CELERY_BROKER=broker, BENCH_CELERY_BACKEND=backend)
    subprocess.run([sys.executable, "-m", "celery", "-A", "bench_celery_app", "purge", "-f"], env=env, cwd=HERE,
                   capture_output=True, check=True)
    worker = subprocess.Popen([sys.executable, "-m", "celery", "-A", "bench_celery_app", "worker", "-c", "2",
                               "-P", "prefork", "-l", "WARNING", "--without-gossip", "--without-mingle",
                               "--without-heartbeat"], env=env, cwd=HERE, start_new_session=True,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        subprocess.run([sys.executable, "-c", "import bench_celery_app as a; a.noop.delay(0).get(timeout=120)"],
                       env=env, cwd=HERE, check=True, timeout=150)  # started and idle
        name, more = _job(kind)
        return _fan_out(f"""
            import time
            from celery import chord
            from bench_celery_app import final, {name}
            began = time.time()
            chord([{name}.s(i{more}) for i in range({n})])(final.s({path!r}))
            print(began)
        """, path, n, env, 900)
    finally:
        _stop([worker])


def fanout_rq(tmp: str, n: int, kind: str, url: str) -> float:
    """RQ: ``n`` jobs, then the finalizer enqueued with ``depends_on`` every one; two ``rq worker``s,
    started and idle."""
    import shutil

    path = f"{tmp}/final-{time.monotonic_ns()}"
    env = child_env(BENCH_RQ_URL=url)
    rq_cli = shutil.which("rq", path=os.path.dirname(sys.executable)) or "rq"
    subprocess.run([sys.executable, "-c", "import redis, os; redis.Redis.from_url(os.environ['BENCH_RQ_URL'])"
                    ".flushdb()"], env=env, check=True)
    workers = [subprocess.Popen([rq_cli, "worker", "--url", url, "-q", "bench"], env=env, cwd=HERE,
                                start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
               for _ in range(2)]
    try:
        time.sleep(2.0)  # started and idle
        name, more = _job(kind)
        return _fan_out(f"""
            import os, time
            import redis
            from rq import Queue
            import bench_rq_jobs
            q = Queue("bench", connection=redis.Redis.from_url(os.environ["BENCH_RQ_URL"]))
            began = time.time()
            jobs = [q.enqueue(bench_rq_jobs.{name}, i{more}) for i in range({n})]
            q.enqueue(bench_rq_jobs.final, {path!r}, depends_on=jobs)
            print(began)
        """, path, n, env, 1800)
    finally:
        _stop(workers)


def compare_main(quick: bool, runs: int, compare: list[str], postgres: str | None) -> int:
    """Fan out, then finalize: the same workloads on litemultistep, Celery (chord) and RQ
    (``depends_on``), each timed from the first add to the finalizer's end, workers started and idle."""
    figures: list[Figure] = []
    ratios: list[str] = []
    add = recorder(figures)
    n, rq_n, cpu_n = (1_000, 500, 100) if quick else (10_000, 2_000, 400)
    print(f"fan-out comparison ({'quick' if quick else 'full'}), {runs} run(s) each", file=sys.stderr)
    with tempfile.TemporaryDirectory(prefix="lms-fanout-") as tmp:
        def repeat(fn: Callable[[], float]) -> list[float]:
            return [fn() for _ in range(runs)]

        ours: dict[str, Figure] = {}
        for kind, size in (("noop", n), ("burn", cpu_n)):
            what = f"{size:,} no-op jobs" if kind == "noop" else f"{size} CPU-bound jobs of 10 ms"
            ours[kind] = add(f"litemultistep (SQLite), {what} + 1 finalizer, worker -c 2", "s",
                             repeat(lambda k=kind, s=size: fanout_litemultistep(tmp, s, k)))
            if postgres:
                from litemultistep.pg import temporary_schema

                def on_pg(k: str = kind, s: int = size) -> float:
                    with temporary_schema(postgres) as url:
                        return fanout_litemultistep(tmp, s, k, url)

                add(f"litemultistep (PostgreSQL), {what} + 1 finalizer, worker -c 2", "s", repeat(on_pg))
            if "celery" in compare:
                for broker, backend, label in (("amqp://guest:guest@127.0.0.1:5672//", "redis://127.0.0.1:6379/15",
                                                "RabbitMQ broker, Redis results"),
                                               ("redis://127.0.0.1:6379/13", "redis://127.0.0.1:6379/15",
                                                "Redis broker and results")):
                    host, port = ("127.0.0.1", 5672) if broker.startswith("amqp") else ("127.0.0.1", 6379)
                    if not (_answers(host, port) and _answers("127.0.0.1", 6379)):
                        print(f"skipped Celery ({label}): nothing answers at {host}:{port} or 127.0.0.1:6379",
                              file=sys.stderr)
                        continue
                    theirs = add(f"Celery chord ({label}), {what} + 1 finalizer, worker -c 2 prefork", "s",
                                 repeat(lambda k=kind, s=size, b=broker, r=backend: fanout_celery(tmp, s, k, b, r)))
                    ratios.append(f"{what}: Celery ({label}) / litemultistep (SQLite): "
                                  f"{statistics.median(theirs.values) / statistics.median(ours[kind].values):.1f}x")
            if "rq" in compare:
                if not _answers("127.0.0.1", 6379):
                    print("skipped RQ: no Redis answers at 127.0.0.1:6379", file=sys.stderr)
                    continue
                rq_size = rq_n if kind == "noop" else size
                rq_what = f"{rq_size:,} no-op jobs" if kind == "noop" else what
                theirs = add(f"RQ, {rq_what} + 1 finalizer depending on each, 2 workers", "s",
                             repeat(lambda k=kind, s=rq_size: fanout_rq(tmp, s, k, "redis://127.0.0.1:6379/14")))
                if rq_size == size:
                    ratios.append(f"{what}: RQ / litemultistep (SQLite): "
                                  f"{statistics.median(theirs.values) / statistics.median(ours[kind].values):.1f}x")
    report(figures, ratios, "local Redis 7 and RabbitMQ for the others")
    return 0


# -- the run ----------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small sizes and one run each: a smoke test")
    parser.add_argument("--compare", choices=["huey", "procrastinate", "celery", "rq"], action="append", default=[],
                        help="also run huey's SqliteHuey on the same workloads (SQLite), or procrastinate on the "
                             "same server (with --db); celery and rq: fan out then finalize, against Celery's chord "
                             "and RQ's depends_on on the local RabbitMQ and Redis (with --db, litemultistep on "
                             "PostgreSQL too)")
    parser.add_argument("--db", metavar="URL",
                        help="benchmark the PostgreSQL backend on this database (postgresql://...) instead")
    parser.add_argument("--runs", type=int, help="runs of each drain (default 3, 1 with --quick)")
    parser.add_argument("--baseline", metavar="DIR",
                        help="also drain with the litemultistep of DIR (a checkout of another commit, e.g. made "
                             "with `git worktree add DIR COMMIT`), same workload, same run, and report the ratio")
    parser.add_argument("--only", choices=["cpu", "memory"], action="append", default=[],
                        help="only CPU-bound jobs against a plain pair of processes, or only the worker's memory "
                             "idle and over two long drains (both are part of the full run)")
    parser.add_argument("--web", action="store_true",
                        help="the web page instead: page times with 10,000 tasks and 1,000,000 queued jobs, and "
                             "the drain with 20 pages watching live (pip install -e '.[web]')")
    args = parser.parse_args(argv)
    LOAD_AT_START[:] = [os.getloadavg()[0]]
    if LOAD_AT_START[0] > 0.25 * (os.cpu_count() or 1):
        print(f"warning: this machine is already busy (load average {LOAD_AT_START[0]:.2f} over the last minute): "
              "every figure will be low; stop what runs, or compare only figures of one run", file=sys.stderr)
    # Start-up is part of some figures: measure it as an installed package starts, from compiled
    # bytecode (pip compiles it at install; an editable checkout under PYTHONDONTWRITEBYTECODE=1
    # would compile every module at every start of every process).
    import litemultistep

    packages = [os.path.dirname(litemultistep.__file__)]
    if args.baseline:
        packages.append(os.path.join(os.path.abspath(args.baseline), "litemultistep"))
    for package in packages:
        compileall.compile_dir(package, quiet=1)
    for name, extra in (("huey", "bench"), ("procrastinate", "bench"), ("celery", "bench"), ("rq", "bench"),
                        ("psycopg", "postgres")):
        if name in args.compare or name == "psycopg" and args.db:
            try:
                __import__(name)
            except ImportError:
                parser.error(f"this run needs {name}: pip install -e '.[{extra}]'")
    if "procrastinate" in args.compare and not args.db:
        parser.error("--compare procrastinate runs on PostgreSQL: give --db postgresql://...")
    quick = args.quick
    runs = args.runs or (1 if quick else 3)
    if {"celery", "rq"} & set(args.compare):
        return compare_main(quick, runs, args.compare, args.db)
    if args.db:
        return postgres_main(args.db, quick, runs, args.compare)
    if args.only:
        figures: list[Figure] = []
        ratios: list[str] = []
        with tempfile.TemporaryDirectory(prefix="lms-bench-") as tmp:
            print(f"litemultistep benchmark: {', '.join(args.only)}", file=sys.stderr)
            cpu_and_memory(tmp, quick, runs, set(args.only), recorder(figures), ratios)
        report(figures, ratios, f"SQLite {sqlite3.sqlite_version}")
        return 0
    if args.web:
        try:
            __import__("litemultistep.web")
        except ImportError:
            parser.error("this run needs the web extra: pip install -e '.[web]'")
        return web_main(quick, args.runs or (1 if quick else 4))
    drain_n = 5_000 if quick else 100_000
    small_n, big_n = (2_000, 50_000) if quick else (10_000, 1_000_000)
    huey_n = 1_000 if quick else 20_000

    figures: list[Figure] = []
    ratios: list[str] = []
    add = recorder(figures)

    with tempfile.TemporaryDirectory(prefix="lms-bench-") as tmp:
        def fresh(name: str) -> str:
            return f"{tmp}/{name}-{time.monotonic_ns()}.sqlite"

        def repeat(fn: Callable[[], float]) -> list[float]:
            return [fn() for _ in range(runs)]

        print(f"litemultistep benchmark ({'quick' if quick else 'full'}), {runs} run(s) each", file=sys.stderr)
        empty = fresh("empty")
        from litemultistep import Database
        Database(empty)
        empty_kb = file_kb(empty)

        def fresh_filled(n: int) -> str:
            db = fresh("drain")
            fill(db, n)
            return db

        def fill_and_drain(n: int, sync: str = "normal") -> float:
            db = fresh("drain")
            fill(db, n, sync)
            return drain(db, n, sync)

        normal = add(f"drain, {drain_n:,} no-op jobs, worker -c 2 --burst (synchronous NORMAL)", "jobs/s",
                     repeat(lambda: fill_and_drain(drain_n)))
        if args.baseline:
            BASELINE.append(os.path.abspath(args.baseline))
            try:
                base = add(f"drain, {drain_n:,} no-op jobs, worker -c 2 --burst, the baseline ({args.baseline})",
                           "jobs/s", repeat(lambda: fill_and_drain(drain_n)))
            finally:
                BASELINE.clear()
            ratios.append(f"no-op drain, this checkout / the baseline: "
                          f"{statistics.median(normal.values) / statistics.median(base.values):.2f}")
        loud = add(f"drain, {drain_n:,} no-op jobs, worker -c 2 --burst at the default log level", "jobs/s",
                   repeat(lambda: drain(fresh_filled(drain_n), drain_n, quiet=False)))
        ratios.append(f"no-op drain at the default log level / with -q: "
                      f"{statistics.median(loud.values) / statistics.median(normal.values):.2f}")
        full = add(f"drain, {drain_n:,} no-op jobs, worker -c 2 --burst (synchronous FULL)", "jobs/s",
                   repeat(lambda: fill_and_drain(drain_n, "full")))

        enq = []
        rss = []
        for _ in range(runs):
            rate, mem = fill(fresh("enqueue"), drain_n)
            enq.append(rate)
            rss.append(mem)
        add(f"enqueue, {drain_n:,} jobs in one with block", "jobs/s", enq)

        big = fresh("big")
        rate, mem = fill(big, big_n)
        add(f"enqueue, {big_n:,} jobs in one with block", "jobs/s", [rate])
        add(f"enqueuing process peak RSS, {big_n:,} jobs", "MB", [mem], f"{statistics.median(rss):.0f} MB for "
            f"{drain_n:,}")
        full_kb = file_kb(big)
        add(f"progress() read, task of {big_n:,} jobs", "µs", [progress_read_us(big)])
        memory: list[float] = []
        big_rate = add(f"drain with {big_n:,} queued", "jobs/s", [drain(big, big_n, memory=memory)])
        add(f"worker RSS at 10% / 90% of {big_n:,} jobs", "MB", memory[:1], f"{memory[0]:.1f} MB at 10%, "
            f"{memory[1]:.1f} MB at 90%")
        small_rate = add(f"drain with {small_n:,} queued", "jobs/s", repeat(lambda: fill_and_drain(small_n)))
        ratios.append(f"drain rate with {big_n:,} queued / with {small_n:,} queued: "
                      f"{statistics.median(big_rate.values) / statistics.median(small_rate.values):.2f}")
        add("file size: empty / full / after the drain", "KB", [file_kb(big)],
            f"{empty_kb:.0f} KB empty, {full_kb:,.0f} KB with {big_n:,} jobs queued, {file_kb(big):.0f} KB after")

        add("finalization: last job run -> first finalizer run", "ms",
            [finalization_latency(tmp, 200) for _ in range(3 if quick else 10)])
        share, pickups = idle(tmp, 2.0 if quick else 10.0, 5 if quick else 20)
        add("idle worker CPU", "% of a core", [share * 100], "all threads, from /proc schedstat")
        add("idle system: commit -> job start", "ms", pickups, f"max {max(pickups):.1f} ms")

        n_sleep, each = (8, 0.25) if quick else (20, 0.5)
        sleepy = [("sleep", [each])] * n_sleep
        for c in (2, 4):
            ideal = n_sleep * each / c
            took = add(f"{n_sleep} jobs of {each:g} s into an idle -c {c} pool: commit -> last job done", "s",
                       repeat(lambda c=c: into_idle_pool(fresh("sleep"), c, sleepy, 1.0 if quick else 2.0)),
                       f"ideal {ideal:g} s")
            ratios.append(f"sleeping jobs, -c {c}: {statistics.median(took.values) / ideal:.2f} x the ideal "
                          f"{ideal:g} s")
        cpu_n = 60 if quick else 300
        burns = [("burn", [0.01])] * cpu_n
        one = add(f"{cpu_n} CPU-bound jobs of 10 ms, worker -c 1 --burst (start-up included)", "s",
                  repeat(lambda: burst_seconds(fresh("cpu1"), 1, burns)))
        two = add(f"{cpu_n} CPU-bound jobs of 10 ms, worker -c 2 --burst (start-up included)", "s",
                  repeat(lambda: burst_seconds(fresh("cpu2"), 2, burns)))
        ratios.append(f"CPU-bound jobs: -c 2 is {statistics.median(one.values) / statistics.median(two.values):.2f}x "
                      "faster than -c 1 on this machine")
        cpu_and_memory(tmp, quick, runs, {"cpu", "memory"}, add, ratios)
        n_noop, n_slow = (200, 4) if quick else (1000, 20)
        mixed: list[tuple[str, list[object]]] = [("noop", [i]) for i in range(n_noop)]
        for k in range(n_slow):
            mixed.insert(k * (n_noop // n_slow) + n_noop // n_slow // 2, ("sleep", [0.2]))
        ideal = n_slow * 0.2 / 2
        took = add(f"{n_noop:,} no-op jobs and {n_slow} jobs of 0.2 s in one task, worker -c 2 --burst "
                   "(start-up included)", "s", repeat(lambda: burst_seconds(fresh("mixed"), 2, mixed)),
                   f"ideal: {ideal:g} s, the sleeping shared by 2")
        ratios.append(f"mixed task: {statistics.median(took.values) / ideal:.2f} x the ideal {ideal:g} s "
                      "(start-up included)")
        add("worker -c 2 --burst: last job run -> process exit", "ms",
            [burst_exit_ms(tmp) for _ in range(3 if quick else 10)])
        limited = add(f"drain, {drain_n:,} no-op jobs with a 60 s time limit each, worker -c 2", "jobs/s",
                      repeat(lambda: _limited_drain(fresh("limit"), drain_n)))
        ratios.append(f"drain with a time limit on every job / without: "
                      f"{statistics.median(limited.values) / statistics.median(normal.values):.2f}")
        kept = add(f"drain, {drain_n:,} no-op jobs keeping their results, worker -c 2", "jobs/s",
                   repeat(lambda: _kept_drain(fresh("kept"), drain_n)))
        ratios.append(f"drain keeping results / without: "
                      f"{statistics.median(kept.values) / statistics.median(normal.values):.2f}")
        read_n = 100_000 if quick else 1_000_000
        rate, grew = results_read(fresh("read"), read_n)
        add(f"task.results() over {read_n:,} stored results", "results/s", [rate],
            f"peak RSS grew {grew:.1f} MB while reading")
        n_tasks = 200 if quick else 1000
        free = add(f"one claim, {n_tasks:,} tasks with queued jobs", "µs", [claim_us(fresh("claim"), n_tasks, False)])
        capped = add(f"one claim, {n_tasks:,} tasks at their max_running and one with room", "µs",
                     [claim_us(fresh("capped"), n_tasks, True)])
        ratios.append(f"a claim past {n_tasks:,} tasks at their limit / with {n_tasks:,} tasks free: "
                      f"{statistics.median(capped.values) / statistics.median(free.values):.2f}")
        if args.baseline:
            BASELINE.append(os.path.abspath(args.baseline))
            try:
                old = add(f"one claim, {n_tasks:,} tasks with queued jobs, the baseline", "µs",
                          [claim_us(fresh("claim-base"), n_tasks, False)])
            finally:
                BASELINE.clear()
            ratios.append(f"a claim past {n_tasks:,} tasks at their limit / the baseline's claim with {n_tasks:,} "
                          f"tasks: {statistics.median(capped.values) / statistics.median(old.values):.2f}")
        worker_us, job_us = isolation_us(tmp, 5_000 if quick else 200_000)
        add("CPU per no-op job in the worker process (claim, record, hand over)", "µs", [worker_us])
        add("CPU per no-op job in the job process (receive, run, report)", "µs", [job_us],
            "the job process is what isolation adds; a no-op job's call itself is about 1 µs")

        if "huey" in args.compare:
            h_full, h_off, h_enq = [], [], []
            for _ in range(runs):
                e, d = huey_run(tmp, huey_n, "default")
                h_enq.append(e)
                h_full.append(d)
                h_off.append(huey_run(tmp, huey_n, "off")[1])
            add(f"huey SqliteHuey drain, {huey_n:,} tasks, -k process -w 2 (defaults: synchronous FULL)", "tasks/s",
                h_full)
            add(f"huey SqliteHuey drain, {huey_n:,} tasks, fsync=False (synchronous OFF)", "tasks/s", h_off)
            add(f"huey enqueue one by one, {huey_n:,} tasks", "tasks/s", h_enq)
            ours_one = []
            for _ in range(runs):
                db = fresh("one")
                code = textwrap.dedent(f"""
                    import time, bench_jobs
                    from litemultistep import MultiStepTask
                    task = MultiStepTask.create("one", db={db!r})
                    t = time.perf_counter()
                    for i in range({huey_n}):
                        task.add_job(bench_jobs.noop, i)
                    print(time.perf_counter() - t)
                """)
                out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                                     env=child_env())
                ours_one.append(huey_n / float(out.stdout))
            add(f"litemultistep enqueue one by one (no with block), {huey_n:,} jobs", "jobs/s", ours_one)
            med = statistics.median
            ratios.append(f"drain, both synchronous FULL: litemultistep / huey = "
                          f"{med(full.values) / med(h_full):.1f}x")
            ratios.append(f"drain, litemultistep NORMAL / huey OFF (weaker than NORMAL) = "
                          f"{med(normal.values) / med(h_off):.1f}x")
            ratios.append(f"enqueue one by one: litemultistep / huey = {med(ours_one) / med(h_enq):.1f}x")

    report(figures, ratios, f"SQLite {sqlite3.sqlite_version}")
    return 0


# -- the web page ----------------------------------------------------------------------------------


class WebServer:
    """A `litemultistep web DB --port 0` process."""

    def __init__(self, db: str, *args: str) -> None:
        fd, self.log = tempfile.mkstemp(prefix="lms-web-", suffix=".log")
        with os.fdopen(fd, "wb") as log:
            self.proc = subprocess.Popen([sys.executable, "-m", "litemultistep", "web", db, "--port", "0", *args],
                                         stdout=log, stderr=log, env=child_env())
        deadline = time.monotonic() + 60
        while True:
            with open(self.log) as f:
                text = f.read()
            if " at http://" in text:
                self.url = text.split(" at ", 1)[1].split()[0].rstrip("/")
                break
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"litemultistep web did not start: {text}")
            time.sleep(0.05)

    def get_ms(self, path: str) -> float:
        import urllib.request

        t = time.perf_counter()
        with urllib.request.urlopen(self.url + path, timeout=30) as r:
            r.read()
        return (time.perf_counter() - t) * 1000

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(30)
        os.unlink(self.log)


def web_page_ms(db: str, tasks: int, times: int) -> dict[str, list[float]]:
    """Milliseconds each page takes to answer, uncached (a refresh of 2 ms lets no read be shared)."""
    from urllib.parse import quote

    conn = sqlite3.connect(db)
    task_id = conn.execute("SELECT task_id FROM task ORDER BY created_at DESC LIMIT 1").fetchone()[0]
    conn.close()
    server = WebServer(db, "--refresh", "0.002")
    last = -(-tasks // 50)
    pages = {"tasks page, first page": "/", f"tasks page, page {last // 2}": f"/?page={last // 2}",
             f"tasks page, last page ({last})": f"/?page={last}",
             "one task's page": "/tasks/" + quote(task_id, safe=""),
             "/api/tasks?limit=50": "/api/tasks?limit=50", "failures page": "/failures", "workers page": "/workers"}
    try:
        out: dict[str, list[float]] = {}
        for name, path in pages.items():
            server.get_ms(path)  # warm: the first read of a table pages it in
            out[name] = [server.get_ms(path) for _ in range(times)]
            time.sleep(0.01)
        return out
    finally:
        server.stop()


def watched_drain(db: str, n: int, watchers: int) -> tuple[float, float]:
    """Drain ``n`` no-op jobs with ``watchers`` open pages polling as the page's script does (every
    second, from a random phase; half on the tasks page, half on the task's page). Returns the
    steady drain rate and the web server's CPU use in % of a core."""
    import http.client
    import random
    import threading
    from urllib.parse import quote

    conn = sqlite3.connect(db)
    task_id = conn.execute("SELECT task_id FROM task LIMIT 1").fetchone()[0]
    conn.close()
    server = WebServer(db)
    stop = threading.Event()
    answered = [0]

    def watch(path: str) -> None:
        # one kept-alive connection per page, as a browser's
        conn = http.client.HTTPConnection(server.url.split("//", 1)[1], timeout=30)
        stop.wait(random.random())
        while not stop.is_set():
            conn.request("GET", path, headers={"X-Live": "1"})
            response = conn.getresponse()
            response.read()
            if response.status != 200:
                raise RuntimeError(f"{path}: HTTP {response.status}")
            answered[0] += 1
            stop.wait(1.0)
        conn.close()

    threads = [threading.Thread(target=watch, args=("/" if k % 2 else "/tasks/" + quote(task_id, safe=""),))
               for k in range(watchers)]
    for t in threads:
        t.start()
    try:
        cpu0, t0 = cpu_seconds(server.proc.pid), time.monotonic()
        rate = drain(db, n)
        share = (cpu_seconds(server.proc.pid) - cpu0) / (time.monotonic() - t0)
    finally:
        stop.set()
        for t in threads:
            t.join()
        server.stop()
    if watchers and not answered[0]:
        raise RuntimeError("no page was answered")
    return rate, share * 100


def web_main(quick: bool, runs: int) -> int:
    figures: list[Figure] = []
    ratios: list[str] = []
    add = recorder(figures)
    tasks, jobs = (1_000, 100_000) if quick else (10_000, 1_000_000)
    drain_n = 20_000 if quick else 100_000
    watchers = 20
    print(f"litemultistep web page benchmark ({'quick' if quick else 'full'}), {runs} run(s) each",
          file=sys.stderr)
    with tempfile.TemporaryDirectory(prefix="lms-bench-") as tmp:
        big = f"{tmp}/web-big.sqlite"
        fill(big, jobs, tasks=tasks)
        times = 10 if quick else 30
        for name, values in web_page_ms(big, tasks, times).items():
            add(f"{name}, {tasks:,} active tasks, {jobs:,} queued jobs", "ms", values,
                f"{times} requests, uncached; max {max(values):.1f} ms")
        plain, watched, cpu = [], [], []
        for k in range(runs):
            for count in (0, watchers) if k % 2 == 0 else (watchers, 0):
                db = f"{tmp}/web-drain-{time.monotonic_ns()}.sqlite"
                fill(db, drain_n)
                rate, share = watched_drain(db, drain_n, count)
                (watched if count else plain).append(rate)
                if count:
                    cpu.append(share)
        add(f"drain, {drain_n:,} no-op jobs, worker -c 2, no page open", "jobs/s", plain)
        add(f"drain, {drain_n:,} no-op jobs, worker -c 2, {watchers} pages watching live", "jobs/s", watched)
        add(f"web server CPU while {watchers} pages watch", "% of a core", cpu)
        ratios.append(f"drain with {watchers} pages watching / with none: "
                      f"{statistics.median(watched) / statistics.median(plain):.3f}")
    report(figures, ratios, f"SQLite {sqlite3.sqlite_version}")
    return 0


def postgres_main(url: str, quick: bool, runs: int, compare: list[str]) -> int:
    figures: list[Figure] = []
    ratios: list[str] = []
    add = recorder(figures)

    import psycopg

    from litemultistep.pg import redact

    print(f"litemultistep PostgreSQL benchmark ({'quick' if quick else 'full'}) on {redact(url)}, {runs} run(s) each",
          file=sys.stderr)
    postgres_run(url, quick, runs, compare, add, ratios)
    with psycopg.connect(url) as conn:
        version = conn.execute("SHOW server_version").fetchone()[0]  # type: ignore[index]
    report(figures, ratios, f"PostgreSQL {version} on the same machine")
    return 0


#: the machine's load average (1 minute) when the run began: a busy machine lowers every figure
LOAD_AT_START: list[float] = []


def report(figures: list[Figure], ratios: list[str], store: str) -> None:
    load = f", load average {LOAD_AT_START[0]:.2f} at the start" if LOAD_AT_START else ""
    print(f"\nMachine: {platform.platform()}, {os.cpu_count()} cores, Python {platform.python_version()}, "
          f"{store}{load}\n")
    print("| workload | result | unit | note |")
    print("| --- | --- | --- | --- |")
    for f in figures:
        print(f"| {f.name} | {f.cell()} | {f.unit} | {f.note} |")
    if ratios:
        print()
        for r in ratios:
            print(f"- {r}")


if __name__ == "__main__":
    sys.exit(main())
