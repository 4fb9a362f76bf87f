"""The RQ side of ``bench.py --compare rq``: jobs that count themselves in Redis, and a finalizer
that depends on every one of them and says how many ran."""

from __future__ import annotations

import os

import redis
from bench_jobs import burn as burn_for
from bench_jobs import stamp

_redis = redis.Redis.from_url(os.environ.get("BENCH_RQ_URL", "redis://127.0.0.1:6379/14"))
COUNTER = "bench-rq-ran"


def noop(i: int) -> None:
    _redis.incr(COUNTER)


def burn_job(i: int, seconds: float) -> None:
    burn_for(seconds)
    _redis.incr(COUNTER)


def final(path: str) -> None:
    stamp(path, f"final-{int(_redis.get(COUNTER) or 0)}")
