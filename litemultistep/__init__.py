"""litemultistep: multi-step tasks on one SQLite file, no server.

A task fans work out into jobs that worker processes run in parallel, keeps exact progress counters,
and once every job has succeeded runs its finalization jobs one after another, in order.
"""

from .config import configure
from .db import Database, NetworkFilesystemWarning
from .embedding import Workers
from .errors import (
    ArgumentNotSerializable,
    DatabaseUnusable,
    FinalizationAlreadyBegun,
    InvalidSlug,
    JobNotFailed,
    JobNotImportable,
    LiteMultiStepError,
    NoDatabaseConfigured,
    NoSuchJob,
    NoSuchMultiStepTask,
    NotInJob,
    NotReadyForFinalization,
    SchemaTooNew,
    StorageError,
)
from .task import MultiStepTask, current_task
from .views import FailureInfo, Progress

__version__ = "0.1.0"

__all__ = [
    "ArgumentNotSerializable",
    "Database",
    "DatabaseUnusable",
    "FailureInfo",
    "FinalizationAlreadyBegun",
    "InvalidSlug",
    "JobNotFailed",
    "JobNotImportable",
    "LiteMultiStepError",
    "MultiStepTask",
    "NetworkFilesystemWarning",
    "NoDatabaseConfigured",
    "NoSuchJob",
    "NoSuchMultiStepTask",
    "NotInJob",
    "NotReadyForFinalization",
    "Progress",
    "SchemaTooNew",
    "StorageError",
    "Workers",
    "configure",
    "current_task",
]
