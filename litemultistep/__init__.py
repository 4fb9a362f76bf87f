"""litemultistep: multi-step tasks on one SQLite file, no server (or on PostgreSQL, for many hosts).

A task fans work out into jobs that worker processes run in parallel, keeps exact progress counters,
and once every job has succeeded runs its finalization jobs one after another, in order.
"""

import importlib
from typing import TYPE_CHECKING, Any

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
    Retry,
    SchemaTooNew,
    StorageError,
    WorkerCrashed,
    WorkersNotStarted,
)

# The rest is imported on first use (PEP 562): a job process, or ``litemultistep --help``, starts
# without the modules it does not need.
_LAZY = {
    "configure": "config",
    "Database": "db",
    "DrainSummary": "runner",
    "FailedAttempt": "runner",
    "NetworkFilesystemWarning": "sqlite",
    "Workers": "embedding",
    "report": "runner",
    "time_left": "runner",
    "JobHandle": "task",
    "JobSpec": "task",
    "MultiStepTask": "task",
    "current_task": "task",
    "job": "task",
    "FailureInfo": "views",
    "JobResult": "views",
    "Progress": "views",
}

if TYPE_CHECKING:
    from .config import configure
    from .db import Database
    from .embedding import Workers
    from .runner import DrainSummary, FailedAttempt, report, time_left
    from .sqlite import NetworkFilesystemWarning
    from .task import JobHandle, JobSpec, MultiStepTask, current_task, job
    from .views import FailureInfo, JobResult, Progress


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'litemultistep' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


__version__ = "0.1.0"

__all__ = [
    "ArgumentNotSerializable",
    "Database",
    "DatabaseBusy",
    "DatabaseUnavailable",
    "DatabaseUnusable",
    "DrainSummary",
    "FailedAttempt",
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
    "Retry",
    "SchemaTooNew",
    "StorageError",
    "WorkerCrashed",
    "WorkersNotStarted",
    "Workers",
    "configure",
    "current_task",
    "job",
    "report",
    "time_left",
]
