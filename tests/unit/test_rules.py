"""The rules that do not depend on a backend, as plain functions of plain values."""

from __future__ import annotations

import math

import pytest

from litemultistep import rules


@pytest.mark.parametrize(("finalizable", "normal", "completed", "failed", "ready", "may"), [
    (False, 0, 0, 0, False, False),   # not finalizable: never, whatever is done
    (False, 3, 3, 0, False, False),
    (True, 0, 0, 0, True, True),      # no normal jobs: at once (the gem's AssureFinalization)
    (True, 3, 2, 0, False, False),
    (True, 3, 3, 0, True, True),
    (True, 3, 2, 1, False, False),    # a failure among the normal jobs
    (True, 3, 3, 1, True, False),     # every normal job done, but a job (a finalizer) failed
    (True, 3, 5, 0, True, True),      # finalizers completed count too
])
def test_finalization_is_due_when_ready_and_nothing_failed(finalizable, normal, completed, failed, ready, may):
    assert rules.ready_for_finalization(finalizable, normal, completed) is ready
    assert rules.may_finalize(finalizable, normal, completed, failed) is may
    assert (rules.why_not_finalizable(finalizable, normal, completed, failed) is None) is may


def test_why_finalization_cannot_start_names_the_first_reason():
    assert rules.why_not_finalizable(False, 3, 0, 2) == "it is not finalizable yet"
    assert rules.why_not_finalizable(True, 3, 1, 2) == "2 job(s) failed"
    assert rules.why_not_finalizable(True, 3, 1, 0) == "1 of 3 normal jobs done"


def test_retry_back_off_doubles_and_is_capped():
    assert [rules.retry_wait(1.5, n) for n in (1, 2, 3, 4)] == [1.5, 3.0, 6.0, 12.0]
    assert rules.retry_wait(0.0, 10) == 0.0
    assert rules.retry_wait(1.0, 10**6) == rules.MAX_RETRY_DELAY
    assert math.isfinite(rules.retry_wait(1e300, 2**62))


def test_a_job_is_retried_while_its_attempts_are_within_max_retries():
    assert [rules.retries(attempt, 2) for attempt in (1, 2, 3, 4)] == [True, True, False, False]
    assert rules.retries(1, 0) is False


@pytest.mark.parametrize(("avg", "max_batch", "window", "size"), [
    (None, 256, 0.003, 1),       # unknown duration: one job, so a slow first job holds nothing else
    (0.001, 256, 0.003, 3),
    (1e-6, 256, 0.003, 256),     # short jobs: capped at the batch limit
    (0.0, 256, 0.003, 256),      # a zero mean does not divide by zero
    (5.0, 256, 0.003, 1),        # slow jobs: one at a time
    (1e-6, 1, 0.003, 1),
    (0.001, 256, 0.010, 10),     # a wider window (PostgreSQL's) takes more
])
def test_a_claim_takes_what_runs_within_its_window(avg, max_batch, window, size):
    assert rules.batch_size(avg, max_batch, window) == size


@pytest.mark.parametrize(("args", "state"), [
    ((True, False, 0, 5, 0, 0), "building"),
    ((False, False, 0, 5, 0, 0), "running"),
    ((False, False, 2, 0, 0, 0), "blocked"),     # failures and nothing else to happen
    ((False, False, 2, 1, 0, 0), "running"),     # failures, but jobs still queued
    ((False, False, 2, 0, 1, 0), "running"),
    ((False, False, 2, 0, 0, 1), "running"),     # an automatic retry is coming
    ((False, True, 0, 0, 1, 0), "finalizing"),
    ((False, True, 1, 0, 0, 0), "blocked"),      # a failed finalizer stops the chain
])
def test_task_state(args, state):
    assert rules.task_state(*args) == state
