"""The exceptions litemultistep raises.

Every error derives from :class:`LiteMultiStepError`. The gem's three errors keep their names. Errors
about bad input also derive from the builtin a caller would expect (``ValueError``, ``TypeError``),
so ``except ValueError`` keeps working.
"""

from __future__ import annotations


class LiteMultiStepError(Exception):
    """Base class of every litemultistep error."""


class NoSuchMultiStepTask(LiteMultiStepError, LookupError):
    """No task has this id: it never existed, was nuked, or has finished (as in the gem)."""


class NotReadyForFinalization(LiteMultiStepError):
    """``finalize()`` was called before every normal job succeeded, or the task is not finalizable."""


class FinalizationAlreadyBegun(LiteMultiStepError):
    """Finalization of the task has begun (or the task is gone): it takes no more jobs."""


class NoDatabaseConfigured(LiteMultiStepError):
    """No database was named: neither ``db=``, ``litemultistep.configure(db=...)`` nor ``LITEMULTISTEP_DB``."""


class DatabaseUnusable(LiteMultiStepError):
    """The database path cannot be used: a directory, not SQLite, read-only, another program's, corrupt."""


class StorageError(DatabaseUnusable):
    """A write failed: the disk is full or failing (or a file size limit was hit). Nothing stored was
    lost; the same write can succeed once there is space again."""


class DatabaseUnavailable(StorageError):
    """The database server cannot be reached (it restarted, the network dropped); a worker keeps
    what it holds and tries again."""


class DatabaseBusy(StorageError):
    """Another connection held the write lock longer than the busy timeout. Nothing was lost; the same
    write can succeed a moment later (workers wait and try again)."""


class Retry(LiteMultiStepError):
    """Raised by a job to ask to run again later, whatever the task's ``retry_on`` says; the attempt
    still counts against ``max_retries``. ``delay``: seconds before the retry (default: the task's
    back-off).
    """

    def __init__(self, delay: float | None = None, message: str = "the job asked to run again") -> None:
        if delay is not None and (isinstance(delay, bool) or not isinstance(delay, (int, float))
                                  or not 0 <= delay < float("inf")):
            raise InvalidSetting(f"Retry(delay=...) takes a finite number of seconds of at least 0, or None, "
                                 f"not {delay!r}")
        super().__init__(message)
        self.delay = delay


class JobTimeout(LiteMultiStepError):
    """Recorded as a job's failure when it ran longer than its time limit and its process was killed."""


class WorkerCrashed(LiteMultiStepError):
    """Recorded as a job's failure when the process running it died that many times (a crash limit)."""


class JobNotAllowed(LiteMultiStepError):
    """Recorded as a job's failure when the worker's ``--allow-module`` does not allow its callable."""


class WorkersNotStarted(LiteMultiStepError, RuntimeError):
    """:class:`litemultistep.Workers` were asked about processes they never started."""


class InvalidSetting(LiteMultiStepError, ValueError):
    """A setting (an argument, an option or a ``LITEMULTISTEP_*`` variable) has a value that cannot work."""


class SchemaTooNew(DatabaseUnusable):
    """The file was written by a newer litemultistep whose schema this version does not know."""


class JobNotImportable(LiteMultiStepError, TypeError):
    """A job's callable cannot be stored by import path, or cannot be imported back."""


class ArgumentNotSerializable(LiteMultiStepError, TypeError):
    """A job argument cannot be carried exactly by JSON."""


class ResultNotSerializable(LiteMultiStepError, TypeError):
    """A job of a task that keeps results returned what JSON cannot carry exactly (the job fails)."""


class NoResult(LiteMultiStepError, LookupError):
    """A job's result was asked for, but there is none (not done yet, failed, or not kept)."""


class InvalidSlug(LiteMultiStepError, ValueError):
    """A task slug that cannot name a queue (empty, too long, control characters, ``~``)."""


class NoSuchJob(LiteMultiStepError, LookupError):
    """No job has this id."""


class JobNotFailed(LiteMultiStepError):
    """Only a failed job can be retried; this one is queued, running or done."""


class NotInJob(LiteMultiStepError):
    """``current_task()`` was called outside a running job."""
