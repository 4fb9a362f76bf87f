"""The benchmark runs (its figures live in docs/benchmarks.md, never in assertions on speed)."""

from __future__ import annotations

import subprocess
import sys

import pytest
from conftest import ROOT

BENCH = ROOT / "scripts" / "bench.py"


@pytest.mark.bench
@pytest.mark.timeout(300)
def test_bench_quick_runs_and_prints_its_table():
    out = subprocess.run([sys.executable, str(BENCH), "--quick"], capture_output=True, text=True, timeout=280)
    assert out.returncode == 0, out.stderr[-2000:]
    table = [line for line in out.stdout.splitlines() if line.startswith("| ")]
    workloads = {line.split(" | ")[0].lstrip("| ") for line in table[2:]}
    assert any(w.startswith("drain, 5,000 no-op jobs") for w in workloads)
    assert {"idle worker CPU", "idle system: commit -> job start"} <= workloads
    assert all(" - |" not in line for line in table[2:]), "a workload printed no figure"


@pytest.mark.bench
@pytest.mark.timeout(300)
def test_bench_of_the_web_page_runs():
    pytest.importorskip("starlette", reason="the web page needs the web extra: pip install -e '.[test,web]'")
    out = subprocess.run([sys.executable, str(BENCH), "--web", "--quick"], capture_output=True, text=True,
                         timeout=280)
    assert out.returncode == 0, out.stderr[-2000:]
    table = [line for line in out.stdout.splitlines() if line.startswith("| ")]
    workloads = {line.split(" | ")[0].lstrip("| ") for line in table[2:]}
    assert "tasks page, first page, 1,000 active tasks, 100,000 queued jobs" in workloads
    assert "drain, 20,000 no-op jobs, worker -c 2, 20 pages watching live" in workloads
    assert all(" - |" not in line for line in table[2:]), "a workload printed no figure"
    assert "drain with 20 pages watching / with none: " in out.stdout
