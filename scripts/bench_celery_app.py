"""The Celery side of ``bench.py --compare celery``: a chord of jobs and a finalizer that says how
many results it got. The broker and the result backend come from the environment."""

from __future__ import annotations

import os

from bench_jobs import burn as burn_for
from bench_jobs import stamp
from celery import Celery

app = Celery("bench_celery_app", broker=os.environ.get("BENCH_CELERY_BROKER", "amqp://guest:guest@127.0.0.1:5672//"),
             backend=os.environ.get("BENCH_CELERY_BACKEND", "redis://127.0.0.1:6379/15"))
app.conf.update(result_expires=600, worker_hijack_root_logger=False, broker_connection_retry_on_startup=True)


@app.task
def noop(i: int) -> int:
    return i


@app.task
def burn_job(i: int, seconds: float) -> int:
    burn_for(seconds)
    return i


@app.task
def final(results: list[int], path: str) -> None:
    stamp(path, f"final-{len(results)}")
