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


class SchemaTooNew(DatabaseUnusable):
    """The file was written by a newer litemultistep whose schema this version does not know."""


class JobNotImportable(LiteMultiStepError, TypeError):
    """A job's callable cannot be stored by import path, or cannot be imported back."""


class ArgumentNotSerializable(LiteMultiStepError, TypeError):
    """A job argument cannot be carried exactly by JSON."""


class InvalidSlug(LiteMultiStepError, ValueError):
    """A task slug that cannot name a queue (empty, too long, control characters, ``~``)."""


class NoSuchJob(LiteMultiStepError, LookupError):
    """No job has this id."""


class JobNotFailed(LiteMultiStepError):
    """Only a failed job can be retried; this one is queued, running or done."""


class NotInJob(LiteMultiStepError):
    """``current_task()`` was called outside a running job."""
