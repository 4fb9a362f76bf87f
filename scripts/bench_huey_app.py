"""The huey side of ``bench.py --compare huey``: SqliteHuey with a no-op task."""

from __future__ import annotations

import os

from huey import SqliteHuey

_fsync = os.environ.get("BENCH_HUEY_FSYNC", "default")
huey = SqliteHuey(filename=os.environ.get("BENCH_HUEY_DB", "huey-bench.sqlite"), results=False,
                  fsync=None if _fsync == "default" else _fsync == "on")


@huey.task()
def noop(i: int) -> None:
    return None
