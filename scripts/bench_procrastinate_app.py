"""procrastinate's side of ``scripts/bench.py --compare procrastinate``: one no-op task."""

from __future__ import annotations

import os

from procrastinate import App, PsycopgConnector

app = App(connector=PsycopgConnector(conninfo=os.environ.get("BENCH_PROCRASTINATE_DB", "")))


@app.task(name="noop")
def noop(i: int) -> None:
    return None
