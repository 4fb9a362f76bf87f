"""The rules that do not depend on a backend: when a task may finalize, when a failed job is tried
again and after how long, how many jobs one claim takes, and what state a task is in.

Pure functions of plain values: the engine decides with them inside its transactions, the views
describe with them, and they have unit tests of their own. Nothing here reads or writes a database.
"""

from __future__ import annotations

#: a claim takes as many of a task's jobs as its mean duration says will run in this many seconds:
#: enough that a job of 10 ms does not wait a round trip to the worker for the next one, few enough
#: that a worker never sits on jobs another worker could start (a slow one gives the rest back)
CLAIM_WINDOW = 0.05
#: the longest wait before an automatic retry, however many attempts came before
MAX_RETRY_DELAY = 7 * 86400.0
#: crashes of a job's process before the job fails with WorkerCrashed (a worker's --max-crashes)
DEFAULT_MAX_CRASHES = 3


def ready_for_finalization(finalizable: bool, normal: int, completed: int) -> bool:
    """The gem's ``ready_for_finalization?``: finalizable, and every normal job completed."""
    return bool(finalizable) and completed >= normal


def may_finalize(finalizable: bool, normal: int, completed: int, failed: int) -> bool:
    """Whether finalization starts now: ready for it, and no job stands failed (the gem's
    ``ready_for_finalization? && !incomplete_because_of_errors?``)."""
    return ready_for_finalization(finalizable, normal, completed) and not failed


def why_not_finalizable(finalizable: bool, normal: int, completed: int, failed: int) -> str | None:
    """Why ``finalize()`` cannot start finalization, or None when it can."""
    if not finalizable:
        return "it is not finalizable yet"
    if failed:
        return f"{failed} job(s) failed"
    if completed < normal:
        return f"{completed} of {normal} normal jobs done"
    return None


def retry_wait(delay: float, attempt: int) -> float:
    """Seconds before automatic retry number ``attempt``: ``delay`` doubling each time, capped at
    :data:`MAX_RETRY_DELAY`."""
    return min(delay * 2.0 ** min(attempt - 1, 64), MAX_RETRY_DELAY)  # 2**64: far past the cap, no overflow


def retries(attempt: int, max_retries: int) -> bool:
    """Whether a job whose attempt number ``attempt`` (of its round: a manual retry starts a new
    one) failed is tried again automatically."""
    return attempt <= max_retries


#: failures no retry can cure: never retried automatically, whatever ``retry_on`` and ``max_retries`` say
NEVER_RETRIED = frozenset(f"litemultistep.errors.{name}" for name in (
    "JobNotImportable", "JobNotAllowed", "ArgumentNotSerializable", "ResultNotSerializable"))
#: what a job raises to ask for a retry, whatever ``retry_on`` says
RETRY = "litemultistep.errors.Retry"


def type_names(cls: type) -> frozenset[str]:
    """``module.qualname`` of a class and of every class it derives from: what ``retry_on`` is
    matched against, so that a subclass of a named exception matches it."""
    return frozenset(f"{c.__module__}.{c.__qualname__}" for c in cls.__mro__)


def may_retry(names: frozenset[str], retry_on: frozenset[str] | None) -> bool:
    """Whether a failure whose exception's :func:`type_names` are ``names`` may be retried
    automatically: never for what no retry can cure; always when the job asked (``Retry``); else
    when ``retry_on`` is None (every exception) or names one of its classes."""
    if names & NEVER_RETRIED:
        return False
    if RETRY in names or retry_on is None:
        return True
    return bool(names & retry_on)


def batch_size(avg_duration: float | None, max_batch: int, window: float = CLAIM_WINDOW) -> int:
    """How many jobs of a task one claim takes: what its mean job duration says runs within
    ``window``, at most ``max_batch``; one while the mean is not known yet."""
    if avg_duration is None or max_batch <= 1:
        return 1
    return max(1, min(max_batch, int(window / max(avg_duration, 1e-7))))


#: the highest and lowest task priority (workers serve higher ones first)
MAX_PRIORITY = 10**9

#: the largest job id there can be (a 64-bit integer on both backends)
MAX_JOB_ID = 2**63 - 1


def impossible_task_id(task_id: object) -> bool:
    """Whether no task can have this id: one holding a NUL character (slugs have no control
    characters, and PostgreSQL refuses a NUL in any text it is given)."""
    return isinstance(task_id, str) and "\x00" in task_id


def heartbeat_every(lease: float) -> float:
    """Seconds between a worker's heartbeats: every 2 s, and five times within its lease."""
    return min(2.0, lease / 5)


def fence_after(lease: float) -> float:
    """Seconds after the start of its last confirmed heartbeat by which a worker that cannot confirm
    its lease again has stopped every job it runs: far enough inside the lease (a quarter of it, at
    least a second) that the jobs have stopped before anyone else may take them."""
    return max(lease - max(1.0, lease / 4), lease / 2)


def storable_text(text: str) -> str:
    """``text`` as both backends store it alike: a NUL byte (which PostgreSQL's text refuses) and a lone
    surrogate (not UTF-8) become visible escapes (``\\x00``, ``\\udc80``); everything else is kept."""
    if "\x00" in text:
        text = text.replace("\x00", "\\x00")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        text = text.encode("utf-8", "backslashreplace").decode("utf-8")
    return text


def task_state(building: bool, finalizing: bool, failed: int, queued: int, running: int, scheduled: int) -> str:
    """A task's state for people: ``building``, ``blocked`` (failed jobs stop it and nothing else is
    queued, running or scheduled), ``finalizing`` or ``running``."""
    if building:
        return "building"
    if failed and not queued and not running and not scheduled:
        return "blocked"
    return "finalizing" if finalizing else "running"
