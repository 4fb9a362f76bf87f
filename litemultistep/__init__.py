"""litemultistep: multi-step tasks on one SQLite file, no server.

A task fans work out into jobs that worker processes run in parallel, keeps exact progress counters,
and once every job has succeeded runs its finalization jobs one after another, in order.
"""

from .config import configure
from .db import Database, NetworkFilesystemWarning
from .embedding import Workers
from .errors import (
    ArgumentNotSerializable,
    DatabaseBusy,
    DatabaseUnavailable,
    DatabaseUnusable,
    FinalizationAlreadyBegun,
    InvalidSetting,
    InvalidSlug,
    JobNotAllowed,
    JobNotFailed,
    JobNotImportable,
    JobTimeout,
    LiteMultiStepError,
    NoDatabaseConfigured,
    NoResult,
    NoSuchJob,
    NoSuchMultiStepTask,
    NotInJob,
    NotReadyForFinalization,
    ResultNotSerializable,
    SchemaTooNew,
    StorageError,
    WorkerCrashed,
)
from .runner import report, time_left
from .task import JobHandle, JobSpec, MultiStepTask, current_task, job
from .views import FailureInfo, JobResult, Progress

__version__ = "0.1.0"

__all__ = [
    "ArgumentNotSerializable",
    "Database",
    "DatabaseBusy",
    "DatabaseUnavailable",
    "DatabaseUnusable",
    "FailureInfo",
    "FinalizationAlreadyBegun",
    "InvalidSetting",
    "InvalidSlug",
    "JobNotAllowed",
    "JobNotFailed",
    "JobNotImportable",
    "JobHandle",
    "JobResult",
    "JobSpec",
    "JobTimeout",
    "LiteMultiStepError",
    "MultiStepTask",
    "NetworkFilesystemWarning",
    "NoDatabaseConfigured",
    "NoResult",
    "NoSuchJob",
    "NoSuchMultiStepTask",
    "NotInJob",
    "NotReadyForFinalization",
    "Progress",
    "ResultNotSerializable",
    "SchemaTooNew",
    "StorageError",
    "WorkerCrashed",
    "Workers",
    "configure",
    "current_task",
    "job",
    "report",
    "time_left",
]
